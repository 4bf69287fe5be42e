"""Forgedit Fine-tune: joint optimisation of the source embedding and the UNet on one image (Forgedit §2-3)."""
import logging
import time

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io

from ..forgedit_ops.finetune import (PRESETS, FinetuneConfig, checkpoint_modules, joint_finetune, preset_options,
                                     trainable_copy, weight_deltas)
from ..forgedit_ops.forgetting import is_trained
from ..forgedit_ops.images import stretch_resize
from ..forgedit_ops.result import ForgeditResult
from ..forgedit_ops.schedule import alphas_cumprod
from .common import (CATEGORY, SDPA, Result, encode_prompt, loaded_unet, require_one_image, require_sd1_eps,
                     unet_fingerprint)
from .storage import cached_or_trained, disk_cache_input

BYTES_FOR_FAST = 24 * 1024**3


def training_options(preset: str, device) -> dict:
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return preset_options(preset, device.type, bf16, comfy.model_management.get_free_memory(device), BYTES_FOR_FAST)


def train_unet_copy(model, rule, cfg: FinetuneConfig, steps: int, train, node_id=None, callback=None):
    """Runs train(eps_model, params, abar, device, tick) on a structural copy of the MODEL's UNet whose `rule` tensors
    are trainable, with a progress bar of `steps` that Cancel interrupts; returns (deltas, train's output, fingerprint)."""
    unet = loaded_unet(model)
    device = comfy.model_management.get_torch_device()
    abar = alphas_cumprod(model.get_model_object("model_sampling").sigmas)
    pbar = comfy.utils.ProgressBar(steps, node_id=node_id)

    def tick(step, loss):
        pbar.update(1)
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback(step, loss)

    with torch.inference_mode(False), torch.enable_grad():
        student, params = trainable_copy(unet, rule, device, cfg.compute_dtype)
        if cfg.checkpointing:
            checkpoint_modules(layer for blocks in (student.input_blocks, [student.middle_block], student.output_blocks)
                               for block in blocks for layer in block)
        out = train(lambda x, t, c: student(x, t, c, transformer_options=dict(SDPA)), params, abar, device, tick)
        deltas = weight_deltas(params, unet)
    del student, params
    comfy.model_management.soft_empty_cache()
    return deltas, out, unet_fingerprint(unet)


def finetune_unet(model, z0: torch.Tensor, e_src: torch.Tensor, cfg: FinetuneConfig, node_id=None, callback=None):
    """Run §3 on a structural copy of the MODEL's UNet; returns (deltas, e_opt, losses, base fingerprint)."""
    def train(eps_model, params, abar, device, tick):
        return joint_finetune(eps_model, params, e_src.clone(), z0.clone().to(device), abar, cfg, tick)

    deltas, (e_opt, losses), base = train_unet_copy(model, is_trained, cfg, cfg.iterations, train, node_id, callback)
    return deltas, e_opt.cpu(), losses, base


def photo_inputs(clip_use: str, source_use: str) -> list:
    """The inputs every per-image fine-tune starts with, in this order (workflows store widget values by position)."""
    return [
        io.Model.Input("model", tooltip="An SD1.x ε-prediction MODEL (Load Checkpoint). It is never modified."),
        io.Clip.Input("clip", tooltip=f"The CLIP of the same checkpoint; {clip_use}"),
        io.Vae.Input("vae", tooltip="The VAE of the same checkpoint; encodes the image into the training latent."),
        io.Image.Input("image", tooltip="The one photo to edit (a batch of 1)."),
        io.String.Input("source_prompt", multiline=True, default="", tooltip=f"What the image shows now: {source_use}"),
    ]


def precision_input(name: str, note: str = ""):
    """The training-precision preset every fine-tune node offers (forgedit_ops.finetune.preset_options)."""
    return io.Combo.Input(name, options=list(PRESETS), default="auto", optional=True,
                          tooltip="exact: fp32 like the reference (bit-for-bit parity). fast: bf16 autocast with fp32 "
                                  "master weights (fp16 on GPUs without bf16). low memory: fast + gradient checkpointing + "
                                  "per-tensor Adam steps with an 8-bit first and a bf16 second moment (no gradient "
                                  "buffer). auto: fast when memory allows, else low memory." + note)


def size_inputs(paper: str) -> list:
    return [io.Int.Input("width", default=512, min=64, max=2048, step=8,
                         tooltip=f"Training and editing width; the image is stretched to it ({paper}). Multiple of 8."),
            io.Int.Input("height", default=512, min=64, max=2048, step=8, tooltip="Training and editing height. Multiple of 8.")]


def check_training_inputs(model, image, width: int, height: int) -> None:
    """The checks every per-image fine-tune shares: an SD1.x ε model, one image, a size the VAE can encode."""
    require_sd1_eps(model)
    require_one_image(image)
    if width % 8 or height % 8:
        raise ValueError(f"width and height must be multiples of 8 (got {width}x{height})")


def require_prompt(text: str, name: str, hint: str) -> None:
    """An empty prompt is an error that says what to type."""
    if not text.strip():
        raise ValueError(f"{name} is empty: {hint}")


def training_latent(model, vae, image, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image stretched to width x height and its model-space latent z0 (fp32)."""
    image = stretch_resize(image[..., :3], width, height)
    return image, model.model.process_latent_in(vae.encode(image)).float()


class ForgeditFinetune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditFinetune",
            display_name="Forgedit Fine-tune",
            category=CATEGORY,
            description="Learns one image: fine-tunes the source-prompt embedding and the UNet's encoder/decoder blocks "
                        "1-3 jointly (Forgedit §3). Train once; interpolation, forgetting and sampling re-run cheaply.",
            inputs=[
                *photo_inputs("encodes the source prompt and the empty negative.",
                              "the BLIP caption in the paper (Forgedit Caption), or type it. At most 75 tokens."),
                *size_inputs("paper: 512, 768 for the storytelling demo"),
                io.Int.Input("samples", default=400, min=1, max=100000,
                             tooltip="Training samples; iterations = samples / batch_size (paper: 400 = 40 x 10)."),
                io.Int.Input("batch_size", default=10, min=1, max=64,
                             tooltip="Copies of the one latent per step, each with its own noise and timestep (paper: 10)."),
                io.Float.Input("unet_lr", default=6e-5, min=0.0, max=1e-2, step=1e-6,
                               tooltip="Adam learning rate of the UNet blocks (paper: 6e-5)."),
                io.Float.Input("text_lr", default=1e-3, min=0.0, max=1e-1, step=1e-5,
                               tooltip="Adam learning rate of the source embedding (paper: 1e-3)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the training noise and timesteps. Change it to retrain on purpose; the same "
                                     "seed and inputs reuse the cached result."),
                io.Boolean.Input("early_stop", default=False,
                                 tooltip="The reference's early stop: end when a batch loss falls below 0.03 after 350 samples."),
                precision_input("preset"),
                disk_cache_input(),
            ],
            outputs=[Result.Output(display_name="result")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, source_prompt, width, height, samples, batch_size, unet_lr, text_lr, seed,
                early_stop, preset="auto", disk_cache=False) -> io.NodeOutput:
        settings = {k: v for k, v in locals().items() if isinstance(v, (str, int, float, bool)) and k != "disk_cache"}
        check_training_inputs(model, image, width, height)
        require_prompt(source_prompt, "source_prompt", "describe the image as it is, or connect Forgedit Caption")
        if samples < batch_size:
            raise ValueError(f"samples ({samples}) must be at least batch_size ({batch_size})")
        cfg = FinetuneConfig(samples=samples, batch_size=batch_size, unet_lr=unet_lr, text_lr=text_lr, seed=seed,
                             early_stop=early_stop,
                             **training_options(preset, comfy.model_management.get_torch_device()))
        e_src = encode_prompt(clip, source_prompt, "source_prompt")
        uncond = encode_prompt(clip, "", "negative")
        image, z0 = training_latent(model, vae, image, width, height)

        def train():
            start = time.perf_counter()
            deltas, e_opt, losses, base = finetune_unet(model, z0, e_src, cfg, cls.hidden.unique_id)
            seconds = time.perf_counter() - start
            logging.info("Forgedit fine-tune: %d steps in %.1f s, final loss %.4f", len(losses), seconds,
                         losses[-1] if losses else float("nan"))
            metadata = {"base_fingerprint": base, "source_prompt": source_prompt, "width": width, "height": height,
                        "seed": seed, "samples": samples, "batch_size": batch_size, "unet_lr": unet_lr,
                        "text_lr": text_lr, "early_stop": early_stop, "preset": preset, "precision": cfg.precision,
                        "steps": len(losses), "losses": losses, "seconds": round(seconds, 2)}
            return ForgeditResult(deltas, e_opt, uncond.cpu(), metadata)

        return io.NodeOutput(cached_or_trained(disk_cache, model, {**settings, **vars(cfg)}, image, z0, e_src, train))
