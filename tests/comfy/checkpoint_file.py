"""Random checkpoint files that core Load Checkpoint accepts: the SD1.5 UNet block layout with 320 channels at every
level and 768-wide cross-attention (detection pins those two), a CLIP-L-shaped text model, a TAESD-layout VAE; and its
SD 2.x v-prediction twin (1024-wide cross-attention, linear projections, the OpenCLIP-H text model)."""
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import comfy.text_encoders.sd2_clip
import torch
from tiny_models import init_weights, sd2_unet_config, sd15_unet_config


def write_shallow_sd15(path, seed: int = 0) -> None:
    """About 0.47 GB in fp16 (UNet 111.5 M, CLIP 123 M parameters); loads in a few seconds."""
    config = comfy.supported_models.SD15(sd15_unet_config(320, 768) | {"channel_mult": [1, 1, 1, 1]})
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    write_checkpoint(path, config, target, seed)


def write_shallow_sd2v(path, seed: int = 0) -> None:
    """About 0.95 GB in fp16 (UNet 115 M, OpenCLIP-H text model 354 M parameters). ComfyUI reads v-prediction off the
    spread of one norm bias (supported_models.SD20.model_type), so that bias is drawn wide."""
    config = comfy.supported_models.SD20(sd2_unet_config(320, 1024) | {"channel_mult": [1, 1, 1, 1]})
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd2_clip.SD2Tokenizer,
                                                    comfy.text_encoders.sd2_clip.SD2ClipModel)

    def v_prediction(unet):
        unet.output_blocks[11][1].transformer_blocks[0].norm1.bias.normal_(0.0, 0.2)
    write_checkpoint(path, config, target, seed, v_prediction)


def write_checkpoint(path, config, clip_target, seed: int, adjust=None) -> None:
    """A checkpoint of the config's UNet, the target's text model and a TAESD VAE, seeded random weights in fp16;
    adjust(unet) changes the UNet's weights in place before it is saved."""
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    init_weights(model.diffusion_model, seed)
    if adjust is not None:
        with torch.no_grad():
            adjust(model.diffusion_model)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    clip = comfy.sd.CLIP(clip_target, model_options={"dtype": torch.float16})
    init_weights(clip.cond_stage_model, seed + 1)
    vae = comfy.sd.VAE(sd=init_weights(comfy.taesd.taesd.TAESD(), seed + 2).state_dict())
    comfy.sd.save_checkpoint(str(path), patcher, clip, vae)
