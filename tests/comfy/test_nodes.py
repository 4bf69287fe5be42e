"""The nodes in a real ComfyUI, called as the executor calls them (inference mode), and through its PromptExecutor."""
import comfy.model_management
import pytest
import torch
from conftest import FINETUNE, assert_base_untouched, cancel_at, run_node
from tiny_models import tiny_model

LONG_PROMPT = "a photo of " + "a very small red disc and " * 20


def sweep(model, result, target, vae, **overrides):
    inputs = dict(model=model, result=result, target=target, vae=vae, mode="vs", gammas="0, 0.8", alphas="0.7",
                  seeds="3, 4", steps=4, cfg=7.5, sampler_name="ddim", scheduler="forgedit_reference", batch_size=3)
    return run_node("ForgeditSampler", **{**inputs, **overrides})[:3]  # latent, images, grid


def test_chain_runs_and_leaves_the_base_model_untouched(tiny, finetuned):
    assert len(finetuned.deltas) == 518 and finetuned.source_embedding.shape == (1, 77, 32)
    assert finetuned.metadata["steps"] == 2 and finetuned.metadata["source_prompt"] == FINETUNE["source_prompt"]
    target, = run_node("CLIPTextEncode", clip=tiny["clip"], text="a blue square")
    edited, = run_node("ForgeditForget", model=tiny["model"], result=finetuned, strategy="encoderattn", degree=0.0)
    latent, images, grid = sweep(edited, finetuned, target, tiny["vae"])
    assert latent["samples"].shape == (4, 4, 8, 8) and torch.isfinite(latent["samples"]).all()
    assert images.shape == (4, 64, 64, 3) and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert grid.shape[1] > 2 * 64 and grid.shape[2] > 2 * 64
    assert_base_untouched(tiny)


def test_every_gamma_of_a_seed_shares_its_noise(tiny, finetuned):
    target, = run_node("CLIPTextEncode", clip=tiny["clip"], text="a blue square")
    edited, = run_node("ForgeditForget", model=tiny["model"], result=finetuned, strategy="donotforget", degree=0.0)
    both, _, _ = sweep(edited, finetuned, target, tiny["vae"], gammas="0.3, 0.3", seeds="5, 6")
    alone, _, _ = sweep(edited, finetuned, target, tiny["vae"], gammas="0.3", seeds="6", batch_size=1)
    s = both["samples"]
    assert torch.allclose(s[0], s[1], atol=1e-4) and not torch.allclose(s[1], s[2], atol=1e-2)
    assert torch.allclose(s[2], alone["samples"][0], atol=1e-4)


def test_cpu_sweep_swaps_sub_quadratic_attention_for_sdpa_with_the_same_edits(comfy, tiny, finetuned, monkeypatch):
    target, = run_node("CLIPTextEncode", clip=tiny["clip"], text="a blue square")
    edited, = run_node("ForgeditForget", model=tiny["model"], result=finetuned, strategy="encoderattn", degree=0.0)
    fast = comfy.pack.nodes.common.sdpa_on_cpu(edited)
    assert fast is not edited and "optimized_attention_override" in fast.model_options["transformer_options"]
    assert "optimized_attention_override" not in edited.model_options.get("transformer_options", {})
    with_sdpa, _, _ = sweep(edited, finetuned, target, tiny["vae"])
    monkeypatch.setattr(comfy.pack.nodes.sampler, "sdpa_on_cpu", lambda model: model)
    sub_quad, _, _ = sweep(edited, finetuned, target, tiny["vae"])
    a, b = with_sdpa["samples"], sub_quad["samples"]
    assert (a - b).abs().max() < 1e-5 * b.abs().max()


def test_interpolate_feeds_core_ksampler(tiny, finetuned):
    target, = run_node("CLIPTextEncode", clip=tiny["clip"], text="a blue square")
    negative, = run_node("CLIPTextEncode", clip=tiny["clip"], text="")
    cond, = run_node("ForgeditInterpolate", result=finetuned, target=target, mode="vp", gammas="1.2", alphas="0.7")
    assert cond[0][0].shape == (1, 77, 32)
    edited, = run_node("ForgeditForget", model=tiny["model"], result=finetuned, strategy="decoderattn", degree=0.0)
    empty, = run_node("EmptyLatentImage", width=64, height=64, batch_size=1)
    latent, = run_node("KSampler", model=edited, seed=1, steps=3, cfg=7.5, sampler_name="euler", scheduler="normal",
                       positive=cond, negative=negative, latent_image=empty, denoise=1.0)
    assert latent["samples"].shape == (1, 4, 8, 8) and torch.isfinite(latent["samples"]).all()
    three, = run_node("ForgeditInterpolate", result=finetuned, target=target, mode="vs", gammas="0.5:0.7:0.1", alphas="0.7")
    assert three[0][0].shape == (3, 77, 32) and three[0][1]["pooled_output"].shape[0] == 3
    assert_base_untouched(tiny)


def test_cancel_stops_the_finetune_and_the_base_is_untouched(tiny):
    with cancel_at(2) as seen, pytest.raises(comfy.model_management.InterruptProcessingException):
        run_node("ForgeditFinetune", model=tiny["model"], clip=tiny["clip"], vae=tiny["vae"], image=tiny["image"],
                 **{**FINETUNE, "samples": 40})
    assert [value for value, _ in seen] == [1, 2]
    assert_base_untouched(tiny)


def finetune_inputs(tiny, **overrides):
    return {**dict(model=tiny["model"], clip=tiny["clip"], vae=tiny["vae"], image=tiny["image"]), **FINETUNE, **overrides}


@pytest.mark.parametrize("overrides, message", [
    ({"image": torch.rand(2, 64, 64, 3)}, "batch of 2"),
    ({"width": 100}, "multiples of 8"),
    ({"width": 60}, "width is 60, below its minimum 64"),
    ({"source_prompt": "  "}, "source_prompt is empty"),
    ({"source_prompt": LONG_PROMPT}, "source_prompt is longer than one 77-token window"),
    ({"samples": 3}, "at least batch_size"),
])
def test_finetune_rejects_bad_input(tiny, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_node("ForgeditFinetune", **finetune_inputs(tiny, **overrides))


def test_finetune_rejects_sdxl(tiny):
    import comfy.supported_models

    config = comfy.supported_models.SDXL({
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 32,
        "num_res_blocks": [1, 1], "transformer_depth": [0, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
        "use_linear_in_transformer": True, "context_dim": 64, "num_head_channels": 8, "transformer_depth_output": [0, 1, 1, 1],
        "use_temporal_attention": False, "use_temporal_resblock": False})
    with torch.inference_mode():
        sdxl = comfy.model_patcher.ModelPatcher(config.get_model({}, "", device=torch.device("cpu")),
                                                load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="SD 1.x and SD 2.x text-to-image checkpoints.*this MODEL is SDXL"):
        run_node("ForgeditFinetune", **finetune_inputs(tiny, model=sdxl))


@pytest.mark.parametrize("gammas, message", [("", "gammas is empty"), ("0.5, big", "gammas: cannot read 'big'")])
def test_interpolate_rejects_bad_gamma(tiny, finetuned, gammas, message):
    target, = run_node("CLIPTextEncode", clip=tiny["clip"], text="a blue square")
    with pytest.raises(ValueError, match=message):
        run_node("ForgeditInterpolate", result=finetuned, target=target, mode="vs", gammas=gammas, alphas="0.7")


def test_interpolate_rejects_a_long_target(tiny, finetuned):
    target, = run_node("CLIPTextEncode", clip=tiny["clip"], text=LONG_PROMPT)
    with pytest.raises(ValueError, match="target prompt is longer than one 77-token window"):
        run_node("ForgeditInterpolate", result=finetuned, target=target, mode="vs", gammas="0.5", alphas="0.7")


def test_sampler_rejects_bad_lists_and_a_model_without_the_result(tiny, finetuned):
    target, = run_node("CLIPTextEncode", clip=tiny["clip"], text="a blue square")
    edited, = run_node("ForgeditForget", model=tiny["model"], result=finetuned, strategy="donotforget", degree=0.0)
    with pytest.raises(ValueError, match="gammas is empty"):
        sweep(edited, finetuned, target, tiny["vae"], gammas=" ")
    with pytest.raises(ValueError, match="seeds: cannot read"):
        sweep(edited, finetuned, target, tiny["vae"], seeds="one")
    with pytest.raises(ValueError, match="connect the MODEL output of Forgedit Forget"):
        sweep(tiny["model"], finetuned, target, tiny["vae"])


def test_forget_rejects_a_result_of_another_base(finetuned):
    with torch.inference_mode():
        other = tiny_model(seed=99)
    with pytest.raises(ValueError, match="trained on another base model"):
        run_node("ForgeditForget", model=other, result=finetuned, strategy="donotforget", degree=0.0)


def test_forget_accepts_a_reloaded_base(finetuned):
    with torch.inference_mode():
        same = tiny_model()
    edited, = run_node("ForgeditForget", model=same, result=finetuned, strategy="noencoder", degree=0.5)
    assert len(edited.patches) == 518


def test_a_connected_gamma_or_alpha_replaces_the_lists(tiny, finetuned):
    """Forgedit Score's FLOAT outputs drive Forgedit Interpolate through its optional gamma / alpha sockets."""
    target, = run_node("CLIPTextEncode", clip=tiny["clip"], text="a blue square")
    typed, = run_node("ForgeditInterpolate", result=finetuned, target=target, mode="vp", gammas="1.2", alphas="0.7")
    linked, = run_node("ForgeditInterpolate", result=finetuned, target=target, mode="vp", gammas="0.1, 0.2",
                       alphas="0.3", gamma=1.2, alpha=0.7)
    assert torch.equal(typed[0][0], linked[0][0]) and linked[0][0].shape[0] == 1
