"""The three inversions through their nodes on the tiny SD1.5 model (T = 10, 64 px): each reconstructs the image's
latent from its x_T under guidance, StyleDiffusion and null-text at least 2x closer than plain DDIM inversion
(design §8.2); the base stays untouched; progress and Cancel."""
import pytest
import torch
from conftest import cancel_at, run_node

INVERT = dict(source_prompt="a red disc on a blue gradient", width=64, height=64, crop="center (reference)",
              steps=10, guidance=7.5)


@pytest.fixture(scope="module")
def scene(tiny, comfy):
    """The tiny MODEL/CLIP/VAE, a 160x128 photo and a tiny ViT-B/16-shaped image encoder of the text width."""
    from tiny_models import init_weights, sample_image

    encoder = comfy.pack.nodes.image_encoder
    config = encoder.vit_config({encoder.PATCH: torch.zeros(32, 3, 16, 16), encoder.FC1: torch.zeros(64, 32),
                                 **{f"vision_model.encoder.layers.{i}.x": 0 for i in range(2)}})
    clip_vision = encoder.clip_vision_model(config)
    init_weights(clip_vision.model, 7)
    with torch.no_grad():  # a bare Parameter ComfyUI leaves uninitialised (torch.empty)
        clip_vision.model.vision_model.embeddings.class_embedding.normal_(generator=torch.Generator().manual_seed(8))
    image = sample_image(160, 128)
    return dict(tiny, image=image, clip_vision=clip_vision)


@torch.inference_mode()
def reconstruction_error(scene, comfy, inv) -> float:
    """‖z̄₀ − z₀‖ of the guided DDIM denoising from the inversion's x_T with what it learned (∅_i, or M_i's values)."""
    from forgedit_ops.ddim import abar_before, ddim_prev, guided, inversion_timesteps
    from forgedit_ops.stylediffusion import MappingNet

    run = comfy.pack.nodes.inversion_run
    z0 = run.prepare_source(scene["model"], scene["clip"], scene["vae"], scene["image"], INVERT).z0
    attend, abar, _, _ = run.frozen_attend(scene["model"])
    z, c, steps = inv.x_T, inv.source_embedding, inv.metadata["steps"]
    for i, t in enumerate(inversion_timesteps(steps)[::-1]):
        uncond = inv.null_embeddings[i:i + 1] if inv.kind == "nulltext" else inv.uncond_embedding
        state = None
        if inv.kind == "stylediffusion":
            mapping = MappingNet()
            mapping.load_state_dict(inv.mapping[i])
            state = mapping(inv.image_features)
        eps = guided(attend(z, t, uncond)[0], attend(z, t, c, state)[0], inv.metadata["guidance"])
        z = ddim_prev(eps, z, abar[t], abar_before(abar, t, 1000 // steps))
    return (z - z0).norm().item()


@pytest.fixture(scope="module")
def ddim(scene):
    return run_node("ForgeditDDIMInversion", model=scene["model"], clip=scene["clip"], vae=scene["vae"],
                    image=scene["image"], **INVERT)


def test_ddim_inversion_is_the_baseline(ddim, scene):
    inv, image = ddim
    assert inv.kind == "ddim" and inv.x_T.shape == (1, 4, 8, 8) and image.shape == (1, 64, 64, 3)
    assert inv.metadata["timesteps"] == list(range(900, -1, -100)) and inv.metadata["source_prompt"]
    assert all(torch.equal(v, scene["base"][k]) for k, v in scene["model"].model.diffusion_model.state_dict().items())


def test_null_text_inversion_reconstructs_twice_as_close(ddim, scene, comfy):
    inv, image = run_node("ForgeditNullTextInversion", model=scene["model"], clip=scene["clip"], vae=scene["vae"],
                          image=scene["image"], inner_steps=40, early_stop=False, precision="exact", **INVERT)
    assert inv.kind == "nulltext" and inv.null_embeddings.shape == (10, 77, 32)
    assert 2 * reconstruction_error(scene, comfy, inv) < reconstruction_error(scene, comfy, ddim[0])


def test_stylediffusion_reconstructs_twice_as_close(ddim, scene, comfy):
    inv, image = run_node("ForgeditStyleDiffusionTrain", model=scene["model"], clip=scene["clip"], vae=scene["vae"],
                          image=scene["image"], clip_vision=scene["clip_vision"], inner_steps=20, attention_loss=True,
                          early_stop=True, seed=0, precision="exact", **INVERT)
    assert inv.kind == "stylediffusion" and len(inv.mapping) == 10 and inv.image_features.shape == (1, 197, 32)
    assert inv.image_features.isfinite().all()
    assert inv.mapping[0]["conv_start.weight"].shape == (154, 197, 1)
    steps = {}
    for i, rec, att in inv.metadata["losses"]:
        steps.setdefault(i, []).append(rec + att)
    assert sum(s[-1] < s[0] for s in steps.values() if len(s) > 1) >= 0.8 * sum(len(s) > 1 for s in steps.values())
    assert all(att > 0 for _, _, att in inv.metadata["losses"])
    assert 2 * reconstruction_error(scene, comfy, inv) < reconstruction_error(scene, comfy, ddim[0])
    assert all(torch.equal(v, scene["base"][k]) for k, v in scene["model"].model.diffusion_model.state_dict().items())


def test_stylediffusion_progress_counts_every_iteration_and_cancel_stops_it(scene):
    import comfy.model_management

    settings = dict(INVERT, steps=4)
    with cancel_at(6) as seen, pytest.raises(comfy.model_management.InterruptProcessingException):
        run_node("ForgeditStyleDiffusionTrain", model=scene["model"], clip=scene["clip"], vae=scene["vae"],
                 image=scene["image"], clip_vision=scene["clip_vision"], inner_steps=3, attention_loss=True,
                 early_stop=False, seed=0, precision="exact", **settings)
    assert seen[-1] == (6, 4 + 3 + 3 + 3 + 3)
    inv, _ = run_node("ForgeditStyleDiffusionTrain", model=scene["model"], clip=scene["clip"], vae=scene["vae"],
                      image=scene["image"], clip_vision=scene["clip_vision"], inner_steps=3, attention_loss=False,
                      early_stop=False, seed=0, precision="exact", **settings)
    assert len(inv.metadata["losses"]) == 12 and all(att == 0 for _, _, att in inv.metadata["losses"])


def sd_inputs(scene, **settings) -> dict:
    return dict(model=scene["model"], clip=scene["clip"], vae=scene["vae"], image=scene["image"],
                clip_vision=scene["clip_vision"], inner_steps=2, attention_loss=True, early_stop=False, seed=0,
                precision="exact", **dict(INVERT, steps=3, **settings))


def test_a_model_that_replaces_the_map_layers_is_refused(scene):
    patched = scene["model"].clone()
    patched.set_model_attn2_replace(lambda q, k, v, extra: q, "output", 4)
    with pytest.raises(ValueError, match="already replaces the cross-attention of output 4"):
        run_node("ForgeditStyleDiffusionTrain", **{**sd_inputs(scene), "model": patched})
    assert "patches_replace" not in scene["model"].model_options.get("transformer_options", {})


def test_the_same_seed_gives_the_same_mappings_and_the_disk_cache_serves_a_rerun(scene, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "forgedit",
                        ([str(tmp_path)], folder_paths.folder_names_and_paths["forgedit"][1]))
    first, _ = run_node("ForgeditStyleDiffusionTrain", **sd_inputs(scene), disk_cache=True)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    again, image = run_node("ForgeditStyleDiffusionTrain", **sd_inputs(scene), disk_cache=True)
    assert again.metadata["seconds"] == first.metadata["seconds"], "served from the cache, not retrained"
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first.mapping, again.mapping) for k in a)
    assert torch.equal(again.reconstruction, first.reconstruction) and image.shape == (1, 64, 64, 3)
    fresh, _ = run_node("ForgeditStyleDiffusionTrain", **sd_inputs(scene))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first.mapping, fresh.mapping) for k in a)
    other, _ = run_node("ForgeditStyleDiffusionTrain", **{**sd_inputs(scene), "seed": 1})
    assert not torch.equal(other.mapping[0]["conv_end.weight"], first.mapping[0]["conv_end.weight"])


def test_fast_inverts_under_bf16_autocast_with_fp32_mappings(scene):
    """The inversion (no guidance) stays close to exact's; the guided path of a random tiny UNet amplifies rounding."""
    exact, _ = run_node("ForgeditStyleDiffusionTrain", **sd_inputs(scene))
    fast, _ = run_node("ForgeditStyleDiffusionTrain", **{**sd_inputs(scene), "precision": "fast"})
    assert fast.metadata["precision"] == "fast" and all(t.dtype == torch.float32 for t in fast.mapping[-1].values())
    assert 0 < (fast.x_T - exact.x_T).norm() < 0.05 * exact.x_T.norm() and fast.reconstruction.isfinite().all()
