"""StyleDiffusion's image encoder E (Li et al. 2023, §3.1): OpenAI CLIP ViT-B/16 from models/clip_vision, all 197
tokens after the final layer norm. Core's CLIPVisionLoader refuses a 12-layer ViT (it knows ViT-L/H/bigG, SigLIP and
DINOv2 only)."""
import json
import os
import tempfile

import comfy.clip_vision
import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..forgedit_ops.image_features import VIT_B16, reference_clip_preprocess
from .common import queue_check
from .v3 import io

CONFIG = os.path.join(os.path.dirname(os.path.realpath(__file__)), "configs", "clip_vision_config_vitb16.json")
PATCH = "vision_model.embeddings.patch_embedding.weight"
POSITIONS = "vision_model.embeddings.position_embedding.weight"
CLASS_TOKEN = "vision_model.embeddings.class_embedding"
FC1 = "vision_model.encoder.layers.0.mlp.fc1.weight"
PROJECTION = "visual_projection.weight"
HEAD_WIDTH = 64  # OpenAI CLIP's ViTs: vision_heads = vision_width // 64
FAMILIES = {12: "ViT-B", 24: "ViT-L", 32: "ViT-H", 48: "ViT-bigG"}  # by layer count, as core's load_clipvision_from_sd
NEEDED = ("StyleDiffusion needs OpenAI CLIP ViT-B/16 (224 px, 197 positions): put openai/clip-vit-base-patch16's "
          "model.safetensors (or pytorch_model.bin) into models/clip_vision")
TOOLTIP = ("The image encoder E that StyleDiffusion's mapping network reads: OpenAI CLIP ViT-B/16 (paper §3.1), all "
           "197 tokens after the final layer norm.")


def vision_weights(path: str) -> dict:
    """The file's vision weights in the HF layout (an OpenAI `visual.*` file converted); text weights dropped."""
    try:
        sd = comfy.utils.load_torch_file(path, safe_load=True)
    except RuntimeError as e:
        if "TorchScript" not in str(e):
            raise
        raise ValueError(f"{os.path.basename(path)} is an OpenAI TorchScript archive (clip.load's ViT-B-16.pt), which "
                         "cannot be read safely: convert it once to a state dict, or use the HF file. " + NEEDED) from e
    if "visual.transformer.resblocks.0.attn.in_proj_weight" in sd:
        sd = comfy.clip_vision.convert_to_transformers(sd, "visual.")
    return {k: v for k, v in sd.items() if k.startswith("vision_model.") or k == PROJECTION}


def layer_count(sd: dict) -> int:
    return len({k.split(".")[3] for k in sd if k.startswith("vision_model.encoder.layers.")})


def require_vit_b16(sd: dict, name: str) -> None:
    """Patch 16 and 197 positions (224 px and the class token), as ViT-B/16; width and depth may be test-sized."""
    if PATCH not in sd or POSITIONS not in sd or FC1 not in sd:
        found = "not a CLIP image encoder (no vision_model.* or visual.* weights)"
    else:
        patch, positions = sd[PATCH].shape[-1], sd[POSITIONS].shape[0]
        if (patch, positions) == (VIT_B16["patch"], VIT_B16["positions"]):
            return
        family = FAMILIES.get(layer_count(sd)) if CLASS_TOKEN in sd else None  # SigLIP has no class token
        shape = f"(patch {patch}, {positions} positions)"
        found = f"a CLIP {family}/{patch} image encoder {shape}" if family else f"not a CLIP ViT-B/16 {shape}"
    raise ValueError(f"{name} is {found}; {NEEDED}")


def vit_config(sd: dict) -> dict:
    """The shipped ViT-B/16 config with the sizes the weights hold (heads: OpenAI's 64-wide, at least one)."""
    with open(CONFIG) as f:
        config = json.load(f)
    width = sd[PATCH].shape[0]
    config.update(hidden_size=width, intermediate_size=sd[FC1].shape[0], num_hidden_layers=layer_count(sd),
                  num_attention_heads=max(1, width // HEAD_WIDTH))
    if PROJECTION in sd:
        config["projection_dim"] = sd[PROJECTION].shape[0]
    else:
        del config["projection_dim"]
    return config


def clip_vision_model(config: dict) -> comfy.clip_vision.ClipVisionModel:
    """Core's CLIP_VISION for a config dict (core reads a json file); fp32 on a CPU, as the reference's clip.load."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "config.json")
        with open(path, "w") as f:
            json.dump(config, f)
        clip_vision = comfy.clip_vision.ClipVisionModel(path)
    if comfy.model_management.is_device_cpu(clip_vision.load_device):
        clip_vision.dtype = torch.float32
        clip_vision.model.to(torch.float32)
    return clip_vision


def load_image_encoder(path: str) -> comfy.clip_vision.ClipVisionModel:
    """An OpenAI CLIP ViT-B/16 file (HF or OpenAI layout) as core's CLIP_VISION; anything else is refused by name."""
    name = os.path.basename(path)
    sd = vision_weights(path)
    require_vit_b16(sd, name)
    clip_vision = clip_vision_model(vit_config(sd))
    missing, _ = clip_vision.load_sd(sd)
    if missing:
        raise ValueError(f"{name} is incomplete: {len(missing)} ViT-B/16 weights missing, e.g. {missing[0]}. {NEEDED}")
    return clip_vision


def image_features(clip_vision, image: torch.Tensor) -> torch.Tensor:
    """StyleDiffusion's E(x) (§3.1): ln_post of all 197 tokens of the reference-preprocessed image, fp32 on the CPU."""
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    pixels = reference_clip_preprocess(image).to(clip_vision.load_device, clip_vision.dtype)
    with torch.no_grad():
        out = clip_vision.model(pixel_values=pixels, intermediate_output=None)
        return clip_vision.model.vision_model.post_layernorm(out[0]).float().cpu()


def require_listed(clip_name) -> None:
    """The chosen file is one ComfyUI lists in models/clip_vision (None: linked, known at run time)."""
    if clip_name is not None and clip_name not in folder_paths.get_filename_list("clip_vision"):
        raise ValueError(f"clip_name {clip_name!r} is not in models/clip_vision. {NEEDED}, then refresh the page")


class ForgeditImageEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditImageEncoderLoader",
            display_name="Forgedit Image Encoder Loader (StyleDiffusion)",
            category="forgedit/inversion",
            description="Loads OpenAI CLIP ViT-B/16 (HF openai/clip-vit-base-patch16 or OpenAI visual.* weights) from "
                        "models/clip_vision. " + TOOLTIP,
            inputs=[io.Combo.Input("clip_name", options=folder_paths.get_filename_list("clip_vision"),
                                   tooltip="A CLIP ViT-B/16 file in models/clip_vision (openai/clip-vit-base-patch16's "
                                           "model.safetensors); ViT-L/H/bigG, SigLIP and DINOv2 are refused.")],
            outputs=[io.ClipVision.Output(display_name="clip_vision", tooltip=TOOLTIP)],
        )

    @classmethod
    def validate_inputs(cls, clip_name=None):
        return queue_check(require_listed, clip_name)

    @classmethod
    def execute(cls, clip_name) -> io.NodeOutput:
        return io.NodeOutput(load_image_encoder(folder_paths.get_full_path_or_raise("clip_vision", clip_name)))
