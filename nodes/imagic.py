"""Forgedit Imagic: Imagic's sequential optimisation (Imagic §3.1) and Forgedit transferred to Imagic (Forgedit §8)."""
import logging
import time

import comfy.model_management
from comfy_api.latest import io

from ..forgedit_ops.finetune import FinetuneConfig, sequential_finetune
from ..forgedit_ops.imagic import SEQUENTIAL_PRESETS
from ..forgedit_ops.result import ForgeditResult
from .common import CATEGORY, Result, encode_prompt
from .finetune import (check_training_inputs, photo_inputs, precision_input, require_prompt, size_inputs,
                       train_unet_copy, training_latent, training_options)
from .storage import cached_or_trained, disk_cache_input

PRESET_TOOLTIP = ("imagic (paper): embedding from the target prompt, 1000 steps at 2e-3, then the whole UNet 1500 steps "
                  "at 5e-7. imagic (diffusers): the community pipeline, 500 at 1e-3 then 1000 at 2e-6. forgedit-imagic "
                  "(Forgedit §8): embedding from the source prompt, 400 text steps then 1000 UNet steps on Forgedit's "
                  "encoder/decoder blocks 1-3 (lrs 1e-3 / 2e-6, our choice); forget encoderattn when editing.")


def finetune_sequential(model, trains, e_init, z0, cfg: FinetuneConfig, text_steps: int, unet_steps: int, node_id=None,
                        callback=None):
    """Imagic §3.1 on a structural copy of the MODEL's UNet; returns (deltas, e_opt, stage-1 and stage-2 losses, fingerprint)."""
    def train(eps_model, params, abar, device, tick):
        return sequential_finetune(eps_model, params, e_init, z0.to(device), abar, cfg, text_steps, unet_steps, tick)

    deltas, (e_opt, text_losses, unet_losses), base = train_unet_copy(model, trains, cfg, text_steps + unet_steps, train,
                                                                       node_id, callback)
    return deltas, e_opt.cpu(), text_losses, unet_losses, base


class ForgeditImagic(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditImagic",
            display_name="Forgedit Imagic",
            category=CATEGORY,
            description="Imagic's sequential optimisation: first the text embedding with the UNet frozen, then the UNet "
                        "with the embedding frozen (Imagic §3.1). Edit with Forgedit Interpolate / Sampler in vs mode: "
                        "gamma is Imagic's eta (e = eta e_tgt + (1 - eta) e_opt; paper 0.6-0.8, > 1 extrapolates).",
            inputs=[
                *photo_inputs("encodes the initial embedding and the empty negative.",
                              "Forgedit Caption or typed, at most 75 tokens. The initial embedding of forgedit-imagic; "
                              "unused by the imagic presets."),
                io.String.Input("target_prompt", multiline=True, default="",
                                tooltip="The edit, e.g. 'a photo of a sitting dog' (at most 75 tokens). The initial "
                                        "embedding of the imagic presets (Imagic §3.1: e_opt starts at e_tgt); encode "
                                        "the same text with CLIP Text Encode as the target when editing."),
                io.Combo.Input("preset", options=list(SEQUENTIAL_PRESETS), default="imagic (paper)", tooltip=PRESET_TOOLTIP),
                *size_inputs("Imagic SD: 512"),
                io.Int.Input("text_steps", default=0, min=0, max=100000,
                             tooltip="Stage-1 embedding steps; 0 = the preset's (paper 1000, diffusers 500, forgedit-imagic 400)."),
                io.Int.Input("unet_steps", default=0, min=0, max=100000,
                             tooltip="Stage-2 UNet steps; 0 = the preset's (paper 1500, diffusers 1000, forgedit-imagic 1000)."),
                io.Float.Input("text_lr", default=0.0, min=0.0, max=1e-1, step=1e-5,
                               tooltip="Stage-1 Adam learning rate; 0 = the preset's (paper 2e-3, diffusers 1e-3, forgedit-imagic 1e-3)."),
                io.Float.Input("unet_lr", default=0.0, min=0.0, max=1e-2, step=1e-7,
                               tooltip="Stage-2 Adam learning rate; 0 = the preset's (paper 5e-7, diffusers 2e-6, forgedit-imagic 2e-6)."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Copies of the one latent per step, each with its own noise and timestep (Imagic: 1)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the training noise and timesteps of both stages."),
                precision_input("training", " Imagic A4: the masters must be fp32, 5e-7 steps vanish in fp16 weights."),
                disk_cache_input(),
            ],
            outputs=[Result.Output(display_name="result")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, source_prompt, target_prompt, preset, width, height, text_steps,
                unet_steps, text_lr, unet_lr, batch_size, seed, training="auto", disk_cache=False) -> io.NodeOutput:
        settings = {k: v for k, v in locals().items() if isinstance(v, (str, int, float, bool)) and k != "disk_cache"}
        spec = SEQUENTIAL_PRESETS[preset]
        check_training_inputs(model, image, width, height)
        if spec.init == "target":
            require_prompt(target_prompt, "target_prompt", f"{preset} starts the embedding from the target prompt")
        else:
            require_prompt(source_prompt, "source_prompt", "describe the image as it is, or connect Forgedit Caption")
        text_steps, unet_steps = text_steps or spec.text_steps, unet_steps or spec.unet_steps
        cfg = FinetuneConfig(batch_size=batch_size, text_lr=text_lr or spec.text_lr, unet_lr=unet_lr or spec.unet_lr,
                             seed=seed, **training_options(training, comfy.model_management.get_torch_device()))
        init_prompt = target_prompt if spec.init == "target" else source_prompt
        e_init = encode_prompt(clip, init_prompt, f"{spec.init}_prompt")
        uncond = encode_prompt(clip, "", "negative")
        image, z0 = training_latent(model, vae, image, width, height)

        def train():
            start = time.perf_counter()
            deltas, e_opt, text_losses, unet_losses, base = finetune_sequential(
                model, spec.trains, e_init, z0, cfg, text_steps, unet_steps, cls.hidden.unique_id)
            seconds = time.perf_counter() - start
            logging.info("Forgedit %s: %d + %d steps in %.1f s", preset, text_steps, unet_steps, seconds)
            metadata = {"method": spec.method, "base_fingerprint": base, "source_prompt": init_prompt,
                        "target_prompt": target_prompt, "width": width, "height": height, "seed": seed,
                        "preset": preset, "text_steps": text_steps, "unet_steps": unet_steps, "text_lr": cfg.text_lr,
                        "unet_lr": cfg.unet_lr, "batch_size": batch_size, "training": training,
                        "precision": cfg.precision, "text_losses": text_losses, "losses": unet_losses,
                        "seconds": round(seconds, 2)}
            return ForgeditResult(deltas, e_opt, uncond.cpu(), metadata)

        return io.NodeOutput(cached_or_trained(disk_cache, model, {**settings, **vars(cfg)}, image, z0, e_init, train))
