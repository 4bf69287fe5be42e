"""The inputs every per-image fine-tune declares, and their queue-time checks (V3 validate_inputs)."""
from ..forgedit_ops.precision import PRESETS
from .common import check_widgets, queue_check
from .v3 import io

WIDGETS = (io.Int.Input, io.Float.Input, io.String.Input, io.Boolean.Input, io.Combo.Input)


FINETUNED_MODELS = "An SD 1.x or SD 2.x MODEL, ε- or v-prediction (Load Checkpoint); the loss follows what it predicts."


def photo_inputs(clip_use: str, source_use: str, models: str = FINETUNED_MODELS) -> list:
    """The inputs every per-image fine-tune starts with, in this order (workflows store widget values by position)."""
    return [
        io.Model.Input("model", tooltip=f"{models} It is never modified."),
        io.Clip.Input("clip", tooltip=f"The CLIP of the same checkpoint; {clip_use}"),
        io.Vae.Input("vae", tooltip="The VAE of the same checkpoint; encodes the image into the training latent."),
        io.Image.Input("image", tooltip="The one photo to edit (a batch of 1)."),
        io.String.Input("source_prompt", multiline=True, default="", tooltip=f"What the image shows now: {source_use}"),
    ]


def size_inputs(paper: str, models: str = " SD 2.x 768-v models: 768.") -> list:
    return [io.Int.Input("width", default=512, min=64, max=2048, step=8,
                         tooltip=f"Training and editing width; the image is stretched to it ({paper}).{models} Multiple "
                                 "of 8."),
            io.Int.Input("height", default=512, min=64, max=2048, step=8, tooltip="Training and editing height. Multiple of 8.")]


def precision_input(note: str = ""):
    """The training-precision input every fine-tune offers (forgedit_ops.precision)."""
    return io.Combo.Input("precision", options=list(PRESETS), default="auto", optional=True,
                          tooltip="exact: fp32 like the reference (bit-for-bit parity). fast: bf16 autocast with fp32 "
                                  "master weights (fp16 with a dynamic loss scale on GPUs without bf16). low memory: "
                                  "fast + gradient checkpointing + Adam with an 8-bit first and a bf16 second moment, "
                                  "stepped inside backward. auto: fast when this run's estimated memory fits the free "
                                  "memory, else low memory. --force-fp32 makes every choice fp32." + note)


def seed_input(tooltip: str):
    return io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False, tooltip=tooltip)


# The inputs the fine-tunes' validate_inputs name (ComfyUI then leaves their range and option checks to us).
QUEUE_CHECKED = ("width", "height", "samples", "batch_size", "source_prompt", "target_prompt", "recipe", "precision")


def check_size(width, height) -> None:
    """A size the VAE encodes exactly: multiples of 8 (None: linked, checked when the node runs)."""
    if width is not None and height is not None and (width % 8 or height % 8):
        raise ValueError(f"width and height must be multiples of 8 (got {width}x{height})")


def check_training_settings(node_cls, values: dict, prompts: dict[str, str]) -> None:
    """The queue-time checks of every fine-tune (a value is None while it comes from a link): ranges and options, a
    size the VAE can encode, samples that make at least one step, and a non-empty prompt for each of `prompts`
    (input name → hint)."""
    check_widgets(node_cls, {k: values.get(k) for k in QUEUE_CHECKED})
    check_size(values.get("width"), values.get("height"))
    samples, batch = values.get("samples"), values.get("batch_size")
    if samples is not None and batch is not None and samples < batch:
        raise ValueError(f"samples ({samples}) must be at least batch_size ({batch}): one step trains batch_size samples")
    for name, hint in prompts.items():
        if values.get(name) is not None and not values[name].strip():
            raise ValueError(f"{name} is empty: {hint}")


DESCRIBE_SOURCE = "describe the image as it is, or connect Forgedit Caption"
SOURCE_PROMPT = {"source_prompt": DESCRIBE_SOURCE}


def validate_sampled_inputs(cls, width=None, height=None, samples=None, batch_size=None, source_prompt=None,
                            precision=None):
    """validate_inputs of the fine-tunes that train `samples` from the source prompt (Fine-tune, DreamBooth)."""
    values = dict(width=width, height=height, samples=samples, batch_size=batch_size, source_prompt=source_prompt,
                  precision=precision)
    return queue_check(check_training_settings, cls, values, SOURCE_PROMPT)
