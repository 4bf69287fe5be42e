"""Tiny but real SD1.5- and SD2-layout MODEL / CLIP / VAE built in-process with ComfyUI's own classes (seeded random
weights)."""
import comfy.ldm.models.autoencoder
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.text_encoders.sd2_clip
import torch
from torch import nn

_INITIALISABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


def init_weights(module: nn.Module, seed: int, perturb_norms: bool = False) -> nn.Module:
    """ComfyUI layers skip initialisation (weights come from files): run torch's own reset_parameters, seeded."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            base = next((b for b in _INITIALISABLE if isinstance(m, b)), None)
            if base is None:
                continue
            base.reset_parameters(m)
            if perturb_norms and isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    return module


def sd15_unet_config(width: int = 32, context: int = 32) -> dict:
    """What comfy.model_detection returns for SD1.5, at another width (SD1.5 itself is 320 / 768)."""
    return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
            "adm_in_channels": None, "in_channels": 4, "model_channels": width, "num_res_blocks": [2, 2, 2, 2],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
            "use_linear_in_transformer": False, "context_dim": context,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            "use_temporal_attention": False, "use_temporal_resblock": False}


def sd2_unet_config(width: int = 32, context: int = 32) -> dict:
    """What comfy.model_detection returns for SD 2.x (linear projections around each transformer), at another width."""
    return sd15_unet_config(width, context) | {"use_linear_in_transformer": True}


def tiny_model(width: int = 32, context: int = 32, seed: int = 0, perturb_norms: bool = False):
    config = comfy.supported_models.SD15(sd15_unet_config(width, context))
    return _patcher(config, comfy.model_base.ModelType.EPS, seed, perturb_norms)


SD2_HEAD_CHANNELS = 16  # SD 2.x's heads are 64 channels wide whatever the level; the tiny width scales them down


def tiny_sd2_model(width: int = 32, context: int = 32, seed: int = 0, perturb_norms: bool = False,
                   prediction: str = "v", config_cls=None, extra=None):
    """An SD 2.x-layout MODEL (ComfyUI's SD20 config, or `config_cls` derived from it, with `extra` UNet settings)
    predicting v (the 768-v models) or eps (the 512 base models)."""
    config = (config_cls or comfy.supported_models.SD20)(sd2_unet_config(width, context) | (extra or {}))
    config.unet_config["num_head_channels"] = SD2_HEAD_CHANNELS
    model_type = {"v": comfy.model_base.ModelType.V_PREDICTION, "eps": comfy.model_base.ModelType.EPS}[prediction]
    return _patcher(config, model_type, seed, perturb_norms)


def _patcher(config, model_type, seed: int, perturb_norms: bool):
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(config, model_type=model_type, device=torch.device("cpu"))
    init_weights(model.diffusion_model, seed, perturb_norms)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_clip(width: int = 32, seed: int = 1):
    options = {"clip_l_model_config": {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2,
                                       "num_hidden_layers": 2, "projection_dim": width}, "dtype": torch.float32}
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options=options)
    init_weights(clip.cond_stage_model, seed)
    return clip


def tiny_sd2_clip(width: int = 32, seed: int = 1, layers: int = 3):
    """ComfyUI's SD 2.x text encoder (OpenCLIP-H layout, read at the penultimate layer, padded with 0), tiny."""
    options = {"clip_h_model_config": {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2,
                                       "num_hidden_layers": layers, "projection_dim": width}, "dtype": torch.float32}
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd2_clip.SD2Tokenizer,
                                                    comfy.text_encoders.sd2_clip.SD2ClipModel)
    clip = comfy.sd.CLIP(target, model_options=options)
    init_weights(clip.cond_stage_model, seed)
    return clip


def tiny_vae(seed: int = 2):
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    params = {"ddconfig": ddconfig, "embed_dim": 4}
    sd = init_weights(comfy.ldm.models.autoencoder.AutoencoderKL(**params), seed).state_dict()
    return comfy.sd.VAE(sd=sd, config={"params": params})


def sample_image(width: int = 64, height: int = 64, seed: int = 3) -> torch.Tensor:
    """A smooth, structured (1, H, W, 3) picture in [0, 1]: a bright disc on a gradient."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    disc = ((x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.25).float()
    rgb = torch.stack([0.3 + 0.5 * disc, 0.2 + 0.3 * (x + 1) / 2, 0.6 - 0.4 * disc], dim=-1)
    return rgb.clamp(0, 1).unsqueeze(0)
