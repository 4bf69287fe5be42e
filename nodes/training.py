"""The one flow of every per-image fine-tune (Forgedit §3, Imagic §3.1, Forgedit §7-8): shared inputs and checks, the
training copy, the table of methods, the metadata schema and the disk cache around it."""
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import comfy.model_management
import comfy.utils
import torch

from ..forgedit_ops.finetune import (FinetuneConfig, checkpoint_modules, deltas_in_place, dreambooth_finetune,
                                     joint_finetune, sequential_finetune, trainable_copy)
from ..forgedit_ops.forgetting import is_trained, missing_blocks, whole_unet
from ..forgedit_ops.images import stretch_resize
from ..forgedit_ops.precision import PRESETS, RunSize, choose_options
from ..forgedit_ops.result import ForgeditResult
from ..forgedit_ops.schedule import alphas_cumprod
from .common import encode_prompt, require_one_image, require_sd1_eps, unet_fingerprint
from .host import RUNTIME_HANDLES, free_memory, low_precision, materialized, sdpa_transformer_options
from .storage import cached_or_trained
from .text_encoder import trainable_text_encoder
from .v3 import io

WIDGETS = (io.Int.Input, io.Float.Input, io.String.Input, io.Boolean.Input, io.Combo.Input)


@dataclass
class TrainingCopy:
    """A trainable copy of the MODEL's UNet: eps(x, t, c), its fp32 master parameters, ᾱ, the device, the per-step
    tick (progress, Cancel) and the loaded base UNet the deltas are taken against."""
    eps: Callable
    params: dict
    abar: torch.Tensor
    device: torch.device
    tick: Callable[[int, float], None]
    base: torch.nn.Module


@contextlib.contextmanager
def training_copy(model, trains: Callable[[str], bool], cfg: FinetuneConfig, steps: int, node_id=None,
                  callback: Optional[Callable[[int, float], None]] = None):
    """Grad-enabled training on a structural copy of the MODEL's UNet, materialised with its patches on its own load
    device, whose `trains` tensors are fp32 masters; a progress bar of `steps` that Cancel interrupts. The copy and its
    memory go on exit; the MODEL is never modified."""
    patcher = materialized(model)
    unet, device = patcher.model.diffusion_model, patcher.load_device
    options = sdpa_transformer_options(patcher)
    pbar = comfy.utils.ProgressBar(steps, node_id=node_id)

    def tick(step, loss):
        pbar.update(1)
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback(step, loss)

    student, params = None, {}
    try:
        with torch.inference_mode(False), torch.enable_grad():
            student, params = trainable_copy(unet, trains, device, cfg.compute_dtype, RUNTIME_HANDLES)
            if cfg.checkpointing:
                checkpoint_modules(layer for blocks in (student.input_blocks, [student.middle_block], student.output_blocks)
                                   for block in blocks for layer in block)
            yield TrainingCopy(lambda x, t, c: student(x, t, c, transformer_options=options), params,
                               alphas_cumprod(model.get_model_object("model_sampling").sigmas), device, tick, unet)
    finally:
        student = None  # the eps closure's reference: frees the copy even while the caller still holds the TrainingCopy
        params.clear()
        comfy.model_management.soft_empty_cache()


@dataclass
class Job:
    """What a method trains from, prepared before the copy exists: the CLIP, the latent z0, the initial embedding,
    the configuration and the node's settings."""
    clip: object
    z0: torch.Tensor
    e_init: torch.Tensor
    cfg: FinetuneConfig
    settings: dict


@dataclass
class Trained:
    """What a method returns: the source embedding, the loss per applied step, and optionally the negative embedding,
    text-encoder deltas and method-specific metadata."""
    embedding: torch.Tensor
    losses: list
    uncond: Optional[torch.Tensor] = None
    text_deltas: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def train_joint(job: Job, run: TrainingCopy) -> Trained:
    e_opt, losses = joint_finetune(run.eps, run.params, job.e_init, job.z0.to(run.device), run.abar, job.cfg, run.tick)
    return Trained(e_opt.cpu(), losses)


def train_sequential(job: Job, run: TrainingCopy) -> Trained:
    e_opt, text_losses, unet_losses = sequential_finetune(
        run.eps, run.params, job.e_init, job.z0.to(run.device), run.abar, job.cfg, job.settings["text_steps"],
        job.settings["unet_steps"], run.tick)
    return Trained(e_opt.cpu(), unet_losses, metadata={"text_losses": text_losses})


def train_dreambooth(job: Job, run: TrainingCopy) -> Trained:
    clip, prompt = job.clip, job.settings["source_prompt"]
    source, empty = clip.tokenize(prompt), clip.tokenize("")
    with trainable_text_encoder(clip, run.device) as (encoder, text_params, deltas):
        losses = dreambooth_finetune(run.eps, run.params, lambda: encoder.encode_token_weights(source)[0].to(run.device),
                                     text_params, job.z0.to(run.device), run.abar, job.cfg, run.tick)
        with torch.no_grad():
            e_src, uncond = (encoder.encode_token_weights(tokens)[0].float().cpu() for tokens in (source, empty))
        text_deltas = deltas()
    return Trained(e_src, losses, uncond, text_deltas)


@dataclass(frozen=True)
class Method:
    """One per-image fine-tune: its name in the result's metadata, the UNet tensors it trains, the prompt its embedding
    starts from, and the forgedit_ops entry point that trains it."""
    name: str
    trains: Callable[[str], bool]
    init: str
    train: Callable[[Job, TrainingCopy], Trained]


METHODS = {m.name: m for m in (
    Method("forgedit", is_trained, "source", train_joint),
    Method("imagic", whole_unet, "target", train_sequential),
    Method("forgedit-imagic", is_trained, "source", train_sequential),
    Method("dreambooth-forgedit", whole_unet, "source", train_dreambooth),
)}


def declared_settings(node_cls, values: dict) -> dict:
    """The node's widget values by its declared inputs (defaults for optional ones left out), disk_cache excluded: what
    identifies a training run in the cache and the metadata."""
    return {i.id: values.get(i.id, i.default) for i in node_cls.define_schema().inputs
            if isinstance(i, WIDGETS) and i.id != "disk_cache"}


def training_options(precision: str, model, method: Method, cfg_fields: dict, width: int, height: int) -> dict:
    """The precision preset's options on the MODEL's device; `auto` compares this run's estimated memory with the free
    memory there (RAM on a CPU, VRAM on a GPU)."""
    device = model.load_device
    unet = model.model.diffusion_model
    trained = sum(p.numel() for k, p in unet.named_parameters() if method.trains(k))
    size = RunSize(trained=trained, frozen=sum(p.numel() for p in unet.parameters()) - trained,
                   batch=cfg_fields.get("batch_size", 1), latent_pixels=(width // 8) * (height // 8),
                   channels=model.model.model_config.unet_config["model_channels"])
    return choose_options(precision, low_precision(device), size, free_memory(model, device))


def require_trainable(model, method: Method) -> None:
    """An SD1.x ε model whose UNet has every block the method trains (a one-level UNet would train nothing)."""
    require_sd1_eps(model)
    missing = missing_blocks(k for k, _ in model.model.diffusion_model.named_parameters())
    if missing and method.trains is is_trained:
        raise ValueError(f"this SD1.x UNet lacks {', '.join(missing)}, which {method.name} fine-tunes (Forgedit §3: "
                         "encoder and decoder blocks 1-3 of the SD1.5 layout): use a full SD 1.4/1.5 checkpoint")


def training_latent(model, vae, image, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image stretched to width x height and its model-space latent z0 (fp32)."""
    image = stretch_resize(image[..., :3], width, height)
    return image, model.model.process_latent_in(vae.encode(image)).float()


def fine_tune(method: Method, model, clip, vae, image, settings: dict, cfg_fields: dict, steps: int, node_id=None,
              disk_cache: bool = False) -> ForgeditResult:
    """Train `method` on one image and return its result; with disk_cache, reuse a stored result of the same inputs."""
    require_trainable(model, method)
    require_one_image(image)
    cfg = FinetuneConfig(**cfg_fields, **training_options(settings["precision"], model, method, cfg_fields,
                                                          settings["width"], settings["height"]))
    e_init = encode_prompt(clip, settings[f"{method.init}_prompt"], f"{method.init}_prompt")
    uncond = encode_prompt(clip, "", "negative")
    image, z0 = training_latent(model, vae, image, settings["width"], settings["height"])
    job = Job(clip, z0, e_init, cfg, settings)

    def train() -> ForgeditResult:
        start = time.perf_counter()
        with training_copy(model, method.trains, cfg, steps, node_id) as run:
            trained = method.train(job, run)
            base = unet_fingerprint(run.base)
            deltas = deltas_in_place(run.params, run.base)
        seconds = time.perf_counter() - start
        logging.info("Forgedit %s: %d steps in %.1f s (%s)", method.name, len(trained.losses), seconds, cfg.precision)
        metadata = {"method": method.name, "base_fingerprint": base, **settings, "precision": cfg.precision,
                    "steps": len(trained.losses), "losses": trained.losses, "seconds": round(seconds, 2),
                    **trained.metadata}
        uncond_out = uncond.cpu() if trained.uncond is None else trained.uncond
        return ForgeditResult(deltas, trained.embedding, uncond_out, metadata, trained.text_deltas)

    return cached_or_trained(disk_cache, model, {**settings, **vars(cfg)}, image, z0, e_init, train)


def photo_inputs(clip_use: str, source_use: str) -> list:
    """The inputs every per-image fine-tune starts with, in this order (workflows store widget values by position)."""
    return [
        io.Model.Input("model", tooltip="An SD1.x ε-prediction MODEL (Load Checkpoint). It is never modified."),
        io.Clip.Input("clip", tooltip=f"The CLIP of the same checkpoint; {clip_use}"),
        io.Vae.Input("vae", tooltip="The VAE of the same checkpoint; encodes the image into the training latent."),
        io.Image.Input("image", tooltip="The one photo to edit (a batch of 1)."),
        io.String.Input("source_prompt", multiline=True, default="", tooltip=f"What the image shows now: {source_use}"),
    ]


def size_inputs(paper: str) -> list:
    return [io.Int.Input("width", default=512, min=64, max=2048, step=8,
                         tooltip=f"Training and editing width; the image is stretched to it ({paper}). Multiple of 8."),
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


def check_widgets(node_cls, values: dict) -> None:
    """ComfyUI's own range and option checks for the given values (it skips them for inputs validate_inputs names)."""
    for i in node_cls.define_schema().inputs:
        value = values.get(i.id)
        if value is None:
            continue
        if getattr(i, "min", None) is not None and value < i.min:
            raise ValueError(f"{i.id} is {value}, below its minimum {i.min}")
        if getattr(i, "max", None) is not None and value > i.max:
            raise ValueError(f"{i.id} is {value}, above its maximum {i.max}")
        if isinstance(i, io.Combo.Input) and value not in i.options:
            raise ValueError(f"{i.id} {value!r} is not one of: {', '.join(map(str, i.options))}")


# The inputs the fine-tunes' validate_inputs name (ComfyUI then leaves their range and option checks to us).
QUEUE_CHECKED = ("width", "height", "samples", "batch_size", "source_prompt", "target_prompt", "recipe", "precision")


def check_training_settings(node_cls, values: dict, prompts: dict[str, str]) -> None:
    """The queue-time checks of every fine-tune (a value is None while it comes from a link): ranges and options, a
    size the VAE can encode, samples that make at least one step, and a non-empty prompt for each of `prompts`
    (input name → hint)."""
    check_widgets(node_cls, {k: values.get(k) for k in QUEUE_CHECKED})
    width, height = values.get("width"), values.get("height")
    if width is not None and height is not None and (width % 8 or height % 8):
        raise ValueError(f"width and height must be multiples of 8 (got {width}x{height})")
    samples, batch = values.get("samples"), values.get("batch_size")
    if samples is not None and batch is not None and samples < batch:
        raise ValueError(f"samples ({samples}) must be at least batch_size ({batch}): one step trains batch_size samples")
    for name, hint in prompts.items():
        if values.get(name) is not None and not values[name].strip():
            raise ValueError(f"{name} is empty: {hint}")


def queue_check(check, *args) -> bool | str:
    """A check as V3 validate_inputs reports it: True, or the message (ComfyUI answers the prompt with HTTP 400)."""
    try:
        check(*args)
    except ValueError as e:
        return str(e)
    return True


DESCRIBE_SOURCE = "describe the image as it is, or connect Forgedit Caption"
SOURCE_PROMPT = {"source_prompt": DESCRIBE_SOURCE}


def validate_sampled_inputs(cls, width=None, height=None, samples=None, batch_size=None, source_prompt=None,
                            precision=None):
    """validate_inputs of the fine-tunes that train `samples` from the source prompt (Fine-tune, DreamBooth)."""
    values = dict(width=width, height=height, samples=samples, batch_size=batch_size, source_prompt=source_prompt,
                  precision=precision)
    return queue_check(check_training_settings, cls, values, SOURCE_PROMPT)
