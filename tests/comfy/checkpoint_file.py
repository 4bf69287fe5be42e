"""A random SD1.x checkpoint file that core Load Checkpoint accepts: the SD1.5 UNet block layout with 320 channels at
every level and 768-wide cross-attention (detection pins those two), a CLIP-L-shaped text model, a TAESD-layout VAE."""
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import torch
from tiny_sd15 import init_weights, sd15_unet_config


def write_shallow_sd15(path, seed: int = 0) -> None:
    """About 0.47 GB in fp16 (UNet 111.5 M, CLIP 123 M parameters); loads in a few seconds."""
    config = comfy.supported_models.SD15(sd15_unet_config(320, 768) | {"channel_mult": [1, 1, 1, 1]})
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    init_weights(model.diffusion_model, seed)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float16})
    init_weights(clip.cond_stage_model, seed + 1)
    vae = comfy.sd.VAE(sd=init_weights(comfy.taesd.taesd.TAESD(), seed + 2).state_dict())
    comfy.sd.save_checkpoint(str(path), patcher, clip, vae)
