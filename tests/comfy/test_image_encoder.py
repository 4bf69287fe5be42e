"""StyleDiffusion's image encoder E (Li et al. 2023, §3.1): a tiny random ViT with ViT-B/16's layout (patch 16, 224
px, 197 tokens, text width 32) from HF and OpenAI files against transformers; the reference preprocessing; refusals."""
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import run_node
from forgedit_ops.image_features import CLIP_MEAN, CLIP_STD, reference_clip_preprocess
from safetensors.torch import save_file
from tiny_models import sample_image

WIDTH = 32


@pytest.fixture(scope="module")
def encoder(comfy):
    return comfy.pack.nodes.image_encoder


@pytest.fixture(scope="module")
def hf_vit():
    """A random transformers CLIPVisionModel of ViT-B/16's layout, every weight perturbed (norms are not 1 and 0)."""
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_attention_heads=1,
                                           num_hidden_layers=2, patch_size=16, image_size=224, hidden_act="quick_gelu")
    model = transformers.CLIPVisionModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_file(hf_vit, tmp_path_factory):
    """openai/clip-vit-base-patch16's model.safetensors layout: `vision_model.*`, the projection and text weights."""
    sd = {"vision_model." + k.removeprefix("vision_model."): v.contiguous() for k, v in hf_vit.state_dict().items()}
    sd.update({"visual_projection.weight": torch.randn(16, WIDTH), "text_model.embeddings.token_embedding.weight":
               torch.randn(10, WIDTH), "logit_scale": torch.tensor(4.6)})
    path = tmp_path_factory.mktemp("hf") / "tiny_vitb16.safetensors"
    save_file(sd, str(path))
    return path, sd


def openai_layout(sd: dict) -> dict:
    """The inverse of comfy.clip_vision.convert_to_transformers: OpenAI clip's `visual.*` keys (plus a text key)."""
    v = {k.removeprefix("vision_model."): t for k, t in sd.items()}
    out = {"visual.conv1.weight": v["embeddings.patch_embedding.weight"],
           "visual.class_embedding": v["embeddings.class_embedding"],
           "visual.positional_embedding": v["embeddings.position_embedding.weight"],
           "visual.proj": sd["visual_projection.weight"].t().contiguous(),
           "token_embedding.weight": torch.randn(10, WIDTH)}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        out.update({f"visual.{ours}.{p}": v[f"{theirs}.{p}"] for p in ("weight", "bias")})
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2"}
    for i in range(2):
        block, layer = f"visual.transformer.resblocks.{i}", f"encoder.layers.{i}"
        for p in ("weight", "bias"):
            out.update({f"{block}.{ours}.{p}": v[f"{layer}.{theirs}.{p}"] for ours, theirs in names.items()})
            out[f"{block}.attn.in_proj_{p}"] = torch.cat([v[f"{layer}.self_attn.{q}_proj.{p}"] for q in "qkv"])
    return out


def reference_features(hf_vit, image) -> torch.Tensor:
    """E(x) from transformers: post_layernorm of last_hidden_state (transformers 5 dropped `.vision_model`)."""
    with torch.no_grad():
        hidden = hf_vit(pixel_values=reference_clip_preprocess(image)).last_hidden_state
        return getattr(hf_vit, "vision_model", hf_vit).post_layernorm(hidden)


def test_hf_file_gives_transformers_features(encoder, hf_vit, hf_file):
    image = sample_image(80, 64)
    clip_vision = encoder.load_image_encoder(str(hf_file[0]))
    features = encoder.image_features(clip_vision, image)
    assert features.shape == (1, 197, WIDTH) and features.dtype == torch.float32
    assert (features - reference_features(hf_vit, image)).abs().max() <= 1e-5


def test_openai_file_gives_the_same_features(encoder, hf_file, tmp_path):
    path = tmp_path / "tiny_vitb16_openai.pt"
    torch.save(openai_layout(hf_file[1]), path)
    image = sample_image(64, 96)
    hf, openai = (encoder.image_features(encoder.load_image_encoder(str(p)), image) for p in (hf_file[0], path))
    assert torch.equal(hf, openai)


def test_reference_preprocessing():
    """torchvision Resize(224), CenterCrop(224) by hand: 302x257 → 263x224, top round(19.5) = 20, not floor 19."""
    image = torch.rand(1, 302, 257, 3, generator=torch.Generator().manual_seed(0))
    by_hand = F.interpolate(image.movedim(-1, 1), size=(263, 224), mode="bicubic", align_corners=False)[:, :, 20:244]
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    px = reference_clip_preprocess(image)
    assert px.shape == (1, 3, 224, 224) and torch.equal(px, (by_hand - mean) / std)
    square = image[:, :224, :224]
    assert torch.allclose(reference_clip_preprocess(square), (square.movedim(-1, 1) - mean) / std, atol=1e-6)


def test_reference_preprocessing_is_not_comfys(comfy):
    """Core's clip_preprocess antialiases and rounds to 8 bit, so its pixels differ on a downscale."""
    import comfy.clip_vision

    image = torch.rand(1, 302, 257, 3, generator=torch.Generator().manual_seed(0))
    assert (reference_clip_preprocess(image) - comfy.clip_vision.clip_preprocess(image)).abs().max() > 0.1


def test_shipped_config_is_a_real_vitb16s(encoder):
    """The key shapes of openai/clip-vit-base-patch16 (on the meta device) yield exactly the shipped json."""
    meta = {"device": "meta"}
    sd = {encoder.PATCH: torch.empty(768, 3, 16, 16, **meta), encoder.POSITIONS: torch.empty(197, 768, **meta),
          encoder.FC1: torch.empty(3072, 768, **meta), encoder.PROJECTION: torch.empty(512, 768, **meta),
          **{f"vision_model.encoder.layers.{i}.layer_norm1.weight": torch.empty(768, **meta) for i in range(12)}}
    encoder.require_vit_b16(sd, "clip-vit-base-patch16.safetensors")
    with open(encoder.CONFIG) as f:
        assert encoder.vit_config(sd) == json.load(f)


def vit_l_shaped() -> dict:
    """A tiny file with ViT-L/14's layout: 24 layers, patch 14, 257 positions."""
    return {key: torch.zeros(shape) for key, shape in (
        ("vision_model.embeddings.patch_embedding.weight", (WIDTH, 3, 14, 14)),
        ("vision_model.embeddings.position_embedding.weight", (257, WIDTH)),
        ("vision_model.embeddings.class_embedding", (WIDTH,)),
        *((f"vision_model.encoder.layers.{i}.mlp.fc1.weight", (2 * WIDTH, WIDTH)) for i in range(24)))}


def write_torchscript(path):
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))


@pytest.mark.filterwarnings("ignore:.*looks like a TorchScript archive", "ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name, write, found", [
    ("vit_l.safetensors", lambda p: save_file(vit_l_shaped(), str(p)),
     "is a CLIP ViT-L/14 image encoder (patch 14, 257 positions)"),
    ("text.safetensors", lambda p: save_file({"text_model.final_layer_norm.weight": torch.ones(WIDTH)}, str(p)),
     "is not a CLIP image encoder"),
    ("ViT-B-16.pt", write_torchscript, "is an OpenAI TorchScript archive"),
])
def test_other_files_are_refused(encoder, tmp_path, name, write, found):
    write(tmp_path / name)
    with pytest.raises(ValueError, match=r"needs OpenAI CLIP ViT-B/16 \(224 px") as error:
        encoder.load_image_encoder(str(tmp_path / name))
    assert str(error.value).startswith(f"{name} {found}") and "into models/clip_vision" in str(error.value)


def test_loader_node(encoder, hf_vit, hf_file, monkeypatch):
    """Through the node, from a registered clip_vision folder; the result also serves core's CLIP Vision Encode."""
    import folder_paths
    import nodes

    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "clip_vision",
                        (list(folder_paths.folder_names_and_paths["clip_vision"][0]),
                         folder_paths.folder_names_and_paths["clip_vision"][1]))
    folder_paths.add_model_folder_path("clip_vision", str(hf_file[0].parent))
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "ForgeditImageEncoderLoader", encoder.ForgeditImageEncoderLoader)
    node = encoder.ForgeditImageEncoderLoader
    assert node.validate_inputs(clip_name=hf_file[0].name) is True
    assert "not in models/clip_vision" in node.validate_inputs(clip_name="clip_vision_g.safetensors")
    clip_vision, = run_node("ForgeditImageEncoderLoader", clip_name=hf_file[0].name)
    image = sample_image(64, 64)
    assert (encoder.image_features(clip_vision, image) - reference_features(hf_vit, image)).abs().max() <= 1e-5
    encoded, = run_node("CLIPVisionEncode", clip_vision=clip_vision, image=image, crop="center")
    assert encoded["last_hidden_state"].shape == (1, 197, WIDTH) and encoded["image_embeds"].shape == (1, 16)
