"""The one flow of the three inversions (DDIM, null-text, StyleDiffusion): inputs prepared once, a UNet copy with
attention control, the loop from forgedit_ops, the P2P_INVERSION with its metadata and the reconstruction."""
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..forgedit_ops.ddim import inversion_timesteps
from ..forgedit_ops.finetune import FinetuneConfig
from ..forgedit_ops.images import center_crop_resize, stretch_resize
from ..forgedit_ops.p2p_inversion import P2PInversion, load_inversion, save_inversion
from ..forgedit_ops.precision import RunSize
from ..forgedit_ops.schedule import alphas_cumprod
from .common import encode_prompt, require_one_image, require_sd1_eps
from .image_encoder import image_features
from .host import materialized, sdpa_transformer_options
from .p2p_attention import make_attend, require_free_layers
from .storage import cached_or_trained
from .training import TrainingCopy, training_options

CROPS = {"center (reference)": center_crop_resize, "stretch": stretch_resize}


@dataclass
class Source:
    """What every inversion starts from: the preprocessed image, its latent z0, the source prompt's c and u = CLIP("")."""
    image: torch.Tensor
    z0: torch.Tensor
    context: torch.Tensor
    uncond: torch.Tensor


def prepare_source(model, clip, vae, image, settings: dict) -> Source:
    """Checks, then the image cropped/resized to width x height, encoded, and both prompts encoded (fp32, CPU)."""
    require_sd1_eps(model)
    require_one_image(image)
    require_free_layers(model.model_options)
    picture = CROPS[settings["crop"]](image[..., :3], settings["width"], settings["height"])
    z0 = model.model.process_latent_in(vae.encode(picture)).float()
    return Source(picture, z0, encode_prompt(clip, settings["source_prompt"], "source_prompt"),
                  encode_prompt(clip, "", "negative"))


def source_features(clip_vision, source: Source) -> torch.Tensor:
    """StyleDiffusion's E(x) of the preprocessed photo, as wide as the text embedding its FiLM multiplies."""
    features = image_features(clip_vision, source.image)
    if features.shape[-1] != source.context.shape[-1]:
        raise ValueError(f"clip_vision features are {features.shape[-1]} wide but this CLIP's text embedding is "
                         f"{source.context.shape[-1]}: StyleDiffusion needs CLIP ViT-B/16 with an SD1.x checkpoint")
    return features


def inversion_precision(model, precision: str, width: int, height: int) -> FinetuneConfig:
    """The precision preset for optimising through the frozen UNet: exact is fp32; fp16 has no loss scale in these
    loops, so a device without bf16 runs them in fp32."""
    unet = model.model.diffusion_model
    size = RunSize(trained=0, frozen=sum(p.numel() for p in unet.parameters()), batch=1,
                   latent_pixels=(width // 8) * (height // 8), channels=model.model.model_config.unet_config["model_channels"])
    options = training_options(precision, model, size)
    if options["precision"] == "fp16":
        options["precision"] = "fp32"
    return FinetuneConfig(precision=options["precision"], checkpointing=options.get("checkpointing", False))


def copy_attend(run: TrainingCopy, cfg: FinetuneConfig):
    """attend() over a training copy: gradients reach what the caller optimises (γ, β, ∅), not the UNet."""
    return make_attend(run.unet, run.options, cfg.compute_dtype, run.device)


def compute_dtype(patcher) -> torch.dtype:
    """The dtype the loaded UNet computes in (its weights', or ComfyUI's manual cast of them)."""
    return patcher.model.manual_cast_dtype or patcher.model.get_dtype()


def frozen_attend(model):
    """attend() over the loaded UNet itself, in its own dtype, for loops without gradients; also ᾱ, the device, the UNet."""
    patcher = materialized(model)
    unet, dtype = patcher.model.diffusion_model, compute_dtype(patcher)
    eps = lambda x, t, c, to: unet(x.to(dtype), t, c.to(dtype), transformer_options=to)
    attend = make_attend(eps, sdpa_transformer_options(patcher), torch.float32, patcher.load_device)
    return attend, alphas_cumprod(model.get_model_object("model_sampling").sigmas), patcher.load_device, unet


def eps_of(attend) -> Callable:
    """eps(z, t, c) without attention control, for the forgedit_ops loops that need only ε."""
    return lambda z, t, c: attend(z, t, c)[0]


def inversion_result(kind: str, source: Source, x_T, base: str, settings: dict, started: float, **fields) -> P2PInversion:
    """The P2P_INVERSION of one run: fp32 CPU tensors and the metadata every kind records."""
    seconds = round(time.perf_counter() - started, 2)
    metadata = {"base_fingerprint": base, **settings, "seconds": seconds, **fields.pop("metadata", {}),
                "timesteps": inversion_timesteps(settings["steps"])[::-1]}
    logging.info("Forgedit %s inversion: %d steps in %.1f s", kind, settings["steps"], seconds)
    return P2PInversion(kind, x_T.float().cpu(), source.context.cpu(), source.uncond.cpu(), metadata,
                        **{k: (v.float().cpu() if isinstance(v, torch.Tensor) else v) for k, v in fields.items()})


def cached_inversion(disk_cache: bool, model, kind: str, settings: dict, source: Source, invert) -> P2PInversion:
    """The optional disk cache around an inversion, keyed like the fine-tunes' (models/forgedit/cache)."""
    return cached_or_trained(disk_cache, model, {**settings, "kind": kind}, source.image, source.z0, source.context,
                             invert, load_inversion, save_inversion)


def decoded(model, vae, z: torch.Tensor) -> torch.Tensor:
    """The IMAGE of a model-space latent (core VAE Decode of a LATENT)."""
    return vae.decode(model.model.process_latent_out(z.float().cpu()))

