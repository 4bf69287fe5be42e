"""Imagic's sequential optimisation (Imagic §3.1) and Forgedit-Imagic: one-step parity with diffusers, stage-1 freezing,
learning on tiny real models, and the node in a real ComfyUI."""
import comfy.model_management
import pytest
import torch
import torch.nn.functional as F
from conftest import FINETUNE, assert_base_untouched, cancel_at, run_node
from test_learning import image_latent, reconstruction_loss
from test_parity import comfy_twin, diffusers_unet, rel
from test_storage import folders, load, run_output_node  # noqa: F401  (folders: fixture)

TEXT_LR, UNET_LR = 1e-3, 2e-6
IMAGIC = dict(source_prompt="", target_prompt="a green triangle on a blue gradient", recipe="imagic (diffusers)", width=64,
              height=64, text_steps=3, unet_steps=2, text_lr=1e-2, unet_lr=1e-4, batch_size=2, seed=0)


@pytest.fixture(scope="module")
def pair(comfy):
    unet_d = diffusers_unet(64, 32, seed=9)
    model, to_ldm = comfy_twin(unet_d, 64, 32)
    return unet_d, model, to_ldm


def sequential(model, text_steps, unet_steps, e_init, z0, seed, batch_size=2):
    from forgedit_ops.finetune import FinetuneConfig, sequential_finetune, trainable_copy
    from forgedit_ops.forgetting import whole_unet
    from forgedit_ops.schedule import alphas_cumprod

    student, params = trainable_copy(model.model.diffusion_model, whole_unet, torch.device("cpu"))
    abar = alphas_cumprod(model.get_model_object("model_sampling").sigmas)
    cfg = FinetuneConfig(batch_size=batch_size, text_lr=TEXT_LR, unet_lr=UNET_LR, seed=seed)
    out = sequential_finetune(lambda x, t, c: student(x, t, c, transformer_options={}), params, e_init, z0, abar, cfg,
                              text_steps, unet_steps)
    return student, params, out


def reference_step(unet_d, z0, e, seed, batch_size=2):
    """One step of the diffusers community pipeline's loss: scheduler.add_noise, ε-MSE."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (batch_size,), generator=g)
    noise = torch.randn((batch_size, *z0.shape[1:]), generator=g)
    x_t = sched.add_noise(z0.repeat(batch_size, 1, 1, 1), noise, t)
    return F.mse_loss(unet_d(x_t, t, encoder_hidden_states=e.expand(batch_size, -1, -1)).sample, noise)


def test_stage1_step_matches_diffusers_and_leaves_the_unet_alone(pair):
    unet_d, model, _ = pair
    z0, e_tgt, seed = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32), 5
    student, params, (e_ours, text_losses, unet_losses) = sequential(model, 1, 0, e_tgt, z0, seed)

    unet_d.requires_grad_(False)
    e_ref = torch.nn.Parameter(e_tgt.clone())
    opt = torch.optim.Adam([e_ref], lr=TEXT_LR)
    loss = reference_step(unet_d, z0, e_ref, seed)
    loss.backward()
    opt.step()

    assert abs(text_losses[0] - loss.item()) <= 1e-5 * loss.item() and unet_losses == []
    assert (e_ours - e_ref.detach()).abs().max() <= 1e-5
    base = model.model.diffusion_model.state_dict()
    assert len(params) == 686 and all(p.grad is None for p in params.values())
    assert all(torch.equal(p, base[k]) for k, p in params.items())


def test_stage2_step_matches_diffusers(pair):
    unet_d, model, to_ldm = pair
    z0, e_opt, seed = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32), 13
    student, params, (e_ours, text_losses, unet_losses) = sequential(model, 0, 1, e_opt, z0, seed)

    unet_d.requires_grad_(True)
    opt = torch.optim.Adam(unet_d.parameters(), lr=UNET_LR)
    loss = reference_step(unet_d, z0, e_opt, seed)
    loss.backward()
    opt.step()
    unet_d.requires_grad_(False)

    assert text_losses == [] and torch.equal(e_ours, e_opt)
    assert abs(unet_losses[0] - loss.item()) <= 1e-5 * loss.item()
    g_ref = {to_ldm[n]: p.grad for n, p in unet_d.named_parameters()}
    g_max = max(v.abs().max() for v in g_ref.values())
    assert set(params) == set(g_ref) and max((params[k].grad - g_ref[k]).abs().max() for k in params) <= 1e-5 * g_max
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([700, 90]), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert rel(student(x, t, ctx, transformer_options={}), unet_d(x, t, encoder_hidden_states=ctx).sample) < 2e-5


@pytest.fixture(scope="module")
def learned(tiny):
    result, = run_node("ForgeditImagic", model=tiny["model"], clip=tiny["clip"], vae=tiny["vae"], image=tiny["image"],
                       **{**IMAGIC, "text_steps": 40, "unet_steps": 20, "batch_size": 4, "text_lr": 2e-1, "unet_lr": 5e-4})
    edited, = run_node("ForgeditForget", model=tiny["model"], result=result, strategy="donotforget", degree=0.0)
    return result, edited


def test_both_stages_lower_the_reconstruction_loss(tiny, learned):
    result, edited = learned
    z0 = tiny["model"].model.process_latent_in(image_latent(tiny))
    target, = run_node("CLIPTextEncode", clip=tiny["clip"], text=IMAGIC["target_prompt"])
    initial = reconstruction_loss(tiny["model"], z0, target[0][0])
    after_text = reconstruction_loss(tiny["model"], z0, result.source_embedding)
    after_unet = reconstruction_loss(edited, z0, result.source_embedding)
    assert after_text < 0.9 * initial and after_unet < 0.7 * after_text
    assert result.metadata["method"] == "imagic" and len(result.metadata["text_losses"]) == 40
    assert_base_untouched(tiny)


def test_node_trains_the_whole_unet_and_forget_keeps_keys_outside_forgedits_set(tiny, learned):
    from forgedit_ops.forgetting import forget_rule, is_trained

    result, _ = learned
    assert len(result.deltas) == 686 and result.source_embedding.shape == (1, 77, 32)
    edited, = run_node("ForgeditForget", model=tiny["model"], result=result, strategy="encoderattn", degree=0.0)
    comfy.model_management.load_models_gpu([edited], force_full_load=True)
    merged = {k: v.clone() for k, v in edited.model.diffusion_model.state_dict().items()}
    comfy.model_management.unload_all_models()
    rule = forget_rule("encoderattn")
    for key, delta in result.deltas.items():
        expected = tiny["base"][key] if rule(key) else tiny["base"][key] + delta
        assert torch.equal(merged[key], expected)
    assert any(not is_trained(k) and d.abs().max() > 0 for k, d in result.deltas.items())
    target, = run_node("CLIPTextEncode", clip=tiny["clip"], text=IMAGIC["target_prompt"])
    cond, = run_node("ForgeditInterpolate", result=result, target=target, mode="vs", gammas="0.7", alphas="0.7")
    assert torch.allclose(cond[0][0], 0.7 * target[0][0] + 0.3 * result.source_embedding, atol=1e-6)
    assert_base_untouched(tiny)


def test_a_whole_unet_result_saves_and_loads(learned, folders):
    result, _ = learned
    run_output_node("ForgeditSave", result=result, filename_prefix="imagic", dtype="fp32")
    loaded = load("imagic_00001_.safetensors")
    assert loaded.deltas.keys() == result.deltas.keys() and len(loaded.deltas) == 686
    assert all(torch.equal(loaded.deltas[k], d) for k, d in result.deltas.items())
    assert torch.equal(loaded.source_embedding, result.source_embedding)
    assert loaded.metadata["method"] == "imagic" and loaded.metadata["text_losses"] == result.metadata["text_losses"]


def test_forgedit_imagic_trains_forgedits_set_from_the_source_prompt(tiny):
    result, = run_node("ForgeditImagic", model=tiny["model"], clip=tiny["clip"], vae=tiny["vae"], image=tiny["image"],
                       **{**IMAGIC, "recipe": "forgedit-imagic", "source_prompt": FINETUNE["source_prompt"],
                          "target_prompt": ""})
    assert len(result.deltas) == 518 and result.metadata["method"] == "forgedit-imagic"
    assert result.metadata["source_prompt"] == FINETUNE["source_prompt"]
    assert_base_untouched(tiny)


def test_progress_spans_both_stages_and_cancel_stops(tiny):
    with cancel_at(4) as seen, pytest.raises(comfy.model_management.InterruptProcessingException):
        run_node("ForgeditImagic", model=tiny["model"], clip=tiny["clip"], vae=tiny["vae"], image=tiny["image"],
                 **{**IMAGIC, "unet_steps": 20})
    assert seen == [(1, 23), (2, 23), (3, 23), (4, 23)]
    assert_base_untouched(tiny)


@pytest.mark.parametrize("overrides, message", [
    ({"image": torch.rand(2, 64, 64, 3)}, "batch of 2"),
    ({"width": 100}, "multiples of 8"),
    ({"target_prompt": " "}, "target_prompt is empty"),
    ({"recipe": "forgedit-imagic"}, "source_prompt is empty"),
    ({"target_prompt": "a photo of " + "a very small red disc and " * 20}, "target_prompt is longer than one 77-token"),
])
def test_imagic_rejects_bad_input(tiny, overrides, message):
    inputs = {**dict(model=tiny["model"], clip=tiny["clip"], vae=tiny["vae"], image=tiny["image"]), **IMAGIC, **overrides}
    with pytest.raises(ValueError, match=message):
        run_node("ForgeditImagic", **inputs)


def test_imagic_disk_cache_hits_on_the_second_run(tiny, folders):
    inputs = dict(model=tiny["model"], clip=tiny["clip"], vae=tiny["vae"], image=tiny["image"], **IMAGIC, disk_cache=True)
    first, = run_node("ForgeditImagic", **inputs)
    second, = run_node("ForgeditImagic", **inputs)
    assert second.metadata == first.metadata
    assert all(torch.equal(second.deltas[k], d) for k, d in first.deltas.items())
    assert torch.equal(second.source_embedding, first.source_embedding)
