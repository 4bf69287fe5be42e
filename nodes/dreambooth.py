"""Forgedit DreamBooth: the whole UNet and the whole CLIP text encoder fine-tuned jointly on one image (Forgedit §7)."""
import functools
import logging
import time

import comfy.clip_model
import comfy.model_management
import torch
from comfy_api.latest import io

from ..forgedit_ops.finetune import FinetuneConfig, dreambooth_finetune, trainable_copy, weight_deltas
from ..forgedit_ops.imagic import whole_unet
from ..forgedit_ops.result import ForgeditResult
from .common import CATEGORY, Result, encode_prompt
from .finetune import (check_training_inputs, photo_inputs, precision_input, require_prompt, size_inputs,
                       train_unet_copy, training_latent, training_options)
from .storage import cached_or_trained, disk_cache_input


def in_text_model(key: str) -> bool:
    """Forgedit §7 trains all of transformers' CLIPTextModel, which has no pooled projection or logit scale."""
    return not key.endswith(("text_projection.weight", "logit_scale"))


def _residual_forward(layer, x, mask=None, optimized_attention=None):
    x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
    return x + layer.mlp(layer.layer_norm2(x))


def differentiable(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """ComfyUI's CLIP layers add their residuals in place, which autograd rejects: on this training copy they add out
    of place (the same arithmetic)."""
    for layer in text_encoder.modules():
        if isinstance(layer, comfy.clip_model.CLIPLayer):
            layer.forward = functools.partial(_residual_forward, layer)
    return text_encoder


def finetune_dreambooth(model, clip, z0, source_prompt: str, cfg: FinetuneConfig, node_id=None, callback=None):
    """Forgedit §7 on structural copies of the MODEL's UNet and the CLIP's text encoder; returns (UNet deltas, text
    encoder deltas, e_src and uncond from the fine-tuned encoder, losses, fingerprint)."""
    source, empty = clip.tokenize(source_prompt), clip.tokenize("")

    def train(eps_model, params, abar, device, tick):
        comfy.model_management.load_models_gpu([clip.patcher], force_full_load=True)
        encoder, text_params = trainable_copy(clip.cond_stage_model, in_text_model, device)
        differentiable(encoder)
        losses = dreambooth_finetune(eps_model, params, lambda: encoder.encode_token_weights(source)[0].to(device),
                                     text_params, z0.to(device), abar, cfg, tick)
        with torch.no_grad():
            e_src, uncond = (encoder.encode_token_weights(tokens)[0].float().cpu() for tokens in (source, empty))
        return weight_deltas(text_params, clip.cond_stage_model), e_src, uncond, losses

    deltas, (text_deltas, e_src, uncond, losses), base = train_unet_copy(model, whole_unet, cfg, cfg.iterations, train,
                                                                         node_id, callback)
    return deltas, text_deltas, e_src, uncond, losses, base


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
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the training noise and timesteps."),
                precision_input("training"),
                disk_cache_input(),
            ],
            outputs=[Result.Output(display_name="result"),
                     io.Clip.Output(display_name="clip", tooltip="The input CLIP with the fine-tuned text encoder applied "
                                                                 "as patches: encode the target prompt with it.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, source_prompt, width, height, samples, batch_size, unet_lr, text_lr, seed,
                training="auto", disk_cache=False) -> io.NodeOutput:
        settings = {k: v for k, v in locals().items() if isinstance(v, (str, int, float, bool)) and k != "disk_cache"}
        check_training_inputs(model, image, width, height)
        require_prompt(source_prompt, "source_prompt", "describe the image as it is, or connect Forgedit Caption")
        if samples < batch_size:
            raise ValueError(f"samples ({samples}) must be at least batch_size ({batch_size})")
        cfg = FinetuneConfig(samples=samples, batch_size=batch_size, unet_lr=unet_lr, text_lr=text_lr, seed=seed,
                             **training_options(training, comfy.model_management.get_torch_device()))
        e_caption = encode_prompt(clip, source_prompt, "source_prompt")  # one 77-token window; sets the CLIP's layer
        image, z0 = training_latent(model, vae, image, width, height)

        def train():
            start = time.perf_counter()
            deltas, text_deltas, e_src, uncond, losses, base = finetune_dreambooth(model, clip, z0, source_prompt, cfg,
                                                                                    cls.hidden.unique_id)
            seconds = time.perf_counter() - start
            logging.info("Forgedit DreamBooth: %d steps in %.1f s, final loss %.4f", len(losses), seconds, losses[-1])
            metadata = {"method": "dreambooth-forgedit", "base_fingerprint": base, "source_prompt": source_prompt,
                        "width": width, "height": height, "seed": seed, "samples": samples, "batch_size": batch_size,
                        "unet_lr": unet_lr, "text_lr": text_lr, "training": training, "precision": cfg.precision,
                        "steps": len(losses), "losses": losses, "seconds": round(seconds, 2)}
            return ForgeditResult(deltas, e_src, uncond, metadata, text_deltas)

        result = cached_or_trained(disk_cache, model, {**settings, **vars(cfg)}, image, z0, e_caption, train)
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
