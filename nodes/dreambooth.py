"""Forgedit DreamBooth: the whole UNet and the whole CLIP text encoder fine-tuned jointly on one image (Forgedit §7)."""
from ..forgedit_ops.result import ForgeditResult
from .common import CATEGORY, Result
from .storage import disk_cache_input
from .training import METHODS, declared_settings, fine_tune
from .training_inputs import (SOURCE_PROMPT, check_training_settings, photo_inputs, precision_input, seed_input,
                              size_inputs, validate_sampled_inputs)
from .v3 import io



class ForgeditDreamBooth(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditDreamBooth",
            display_name="Forgedit DreamBooth",
            category=CATEGORY,
            description="DreamBooth+Forgedit (Forgedit §7): fine-tunes the whole UNet and the whole CLIP text encoder on "
                        "one image and its caption (no rare token, no class images). Encode the target with the CLIP "
                        "output, then Forgedit Interpolate / Forget (dreambooth: strategies) / Sampler as usual.",
            inputs=[
                *photo_inputs("its text encoder is fine-tuned on a copy, the input CLIP is never modified.",
                              "the BLIP caption in the paper (Forgedit Caption), re-encoded by the training text "
                              "encoder every step. At most 75 tokens."),
                *size_inputs("paper: 512"),
                io.Int.Input("samples", default=400, min=1, max=100000,
                             tooltip="Training samples; iterations = samples / batch_size (paper: 400 = 100 x 4, no early stop)."),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Copies of the one latent per step, each with its own noise and timestep (paper: 4)."),
                io.Float.Input("unet_lr", default=5e-6, min=0.0, max=1e-2, step=1e-7,
                               tooltip="Adam learning rate of the whole UNet (paper: 5e-6)."),
                io.Float.Input("text_lr", default=5e-6, min=0.0, max=1e-2, step=1e-7,
                               tooltip="Adam learning rate of the whole text encoder (paper: 5e-6)."),
                seed_input("Seeds the training noise and timesteps."),
                precision_input(),
                disk_cache_input(),
            ],
            outputs=[Result.Output(display_name="result"),
                     io.Clip.Output(display_name="clip", tooltip="The input CLIP with the fine-tuned text encoder applied "
                                                                 "as patches: encode the target prompt with it.")],
            hidden=[io.Hidden.unique_id],
        )

    validate_inputs = classmethod(validate_sampled_inputs)

    @classmethod
    def execute(cls, model, clip, vae, image, disk_cache=False, **widgets) -> io.NodeOutput:
        settings = declared_settings(cls, widgets)
        check_training_settings(cls, settings, SOURCE_PROMPT)
        cfg = {k: settings[k] for k in ("samples", "batch_size", "unet_lr", "text_lr", "seed")}
        result = fine_tune(METHODS["dreambooth-forgedit"], model, clip, vae, image, settings, cfg,
                           settings["samples"] // settings["batch_size"], cls.hidden.unique_id, disk_cache)
        return io.NodeOutput(result, fine_tuned_clip(clip, result))


def fine_tuned_clip(clip, result: ForgeditResult):
    """Forgedit §7 edits encode the target with the fine-tuned text encoder: a CLIP clone with Δ as patches."""
    if not result.text_deltas:
        raise ValueError("this result has no fine-tuned text encoder: only Forgedit DreamBooth trains one; encode the "
                         "target with the checkpoint's own CLIP for Forgedit Fine-tune and Imagic results")
    tuned = clip.clone()
    tuned.add_patches({k: (d,) for k, d in result.text_deltas.items()}, 1.0)
    return tuned


class ForgeditTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditTextEncoder",
            display_name="Forgedit Text Encoder",
            category=CATEGORY,
            description="Applies a DreamBooth-Forgedit result's fine-tuned text encoder to the checkpoint's CLIP, e.g. "
                        "after Forgedit Load, so the target prompt is encoded as the paper edits (Forgedit §7).",
            inputs=[Result.Input("result", tooltip="A Forgedit DreamBooth result (fresh or from Forgedit Load)."),
                    io.Clip.Input("clip", tooltip="The CLIP of the checkpoint the result was trained on; not modified.")],
            outputs=[io.Clip.Output(display_name="clip", tooltip="Encode the target prompt with this CLIP.")],
        )

    @classmethod
    def execute(cls, result, clip) -> io.NodeOutput:
        return io.NodeOutput(fine_tuned_clip(clip, result))
