"""DreamBooth+Forgedit (Forgedit §7): one-step parity of the joint UNet + text-encoder step with diffusers, gradients
reaching ComfyUI's text encoder, learning, and the node leaving the base MODEL and CLIP untouched."""
import comfy.model_management
import pytest
import torch
from conftest import FINETUNE, assert_base_untouched, run_node
from test_imagic import pair, reference_step  # noqa: F401  (module fixture)
from test_storage import folders, load, run_output_node  # noqa: F401  (folders: fixture)
from test_learning import image_latent, reconstruction_loss
from test_parity import rel

LR = 5e-6
DREAMBOOTH = dict(source_prompt=FINETUNE["source_prompt"], width=64, height=64, samples=8, batch_size=4, unet_lr=1e-4,
                  text_lr=1e-4, seed=0)


def test_one_step_matches_diffusers(pair):
    from forgedit_ops.finetune import FinetuneConfig, dreambooth_finetune, trainable_copy
    from forgedit_ops.forgetting import whole_unet
    from forgedit_ops.schedule import alphas_cumprod

    unet_d, model, to_ldm = pair
    z0, tokens, seed = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32), 21
    torch.manual_seed(0)
    encoder_d = torch.nn.Linear(32, 32)

    student, params = trainable_copy(model.model.diffusion_model, whole_unet, torch.device("cpu"))
    encoder, text_params = trainable_copy(encoder_d, lambda k: True, torch.device("cpu"))
    abar = alphas_cumprod(model.get_model_object("model_sampling").sigmas)
    cfg = FinetuneConfig(samples=2, batch_size=2, unet_lr=LR, text_lr=LR, seed=seed)
    losses = dreambooth_finetune(lambda x, t, c: student(x, t, c, transformer_options={}), params, lambda: encoder(tokens),
                                 text_params, z0, abar, cfg)

    unet_d.requires_grad_(True)
    opt = torch.optim.Adam([*unet_d.parameters(), *encoder_d.parameters()], lr=LR)
    loss = reference_step(unet_d, z0, encoder_d(tokens), seed)
    loss.backward()
    opt.step()
    unet_d.requires_grad_(False)

    assert abs(losses[0] - loss.item()) <= 1e-5 * loss.item()
    g_ref = {to_ldm[n]: p.grad for n, p in unet_d.named_parameters()}
    g_max = max(v.abs().max() for v in g_ref.values())
    assert len(params) == 686 and max((params[k].grad - g_ref[k]).abs().max() for k in params) <= 1e-5 * g_max
    assert all(torch.allclose(text_params[n].grad, p.grad, rtol=1e-4, atol=1e-6 * p.grad.abs().max())
               for n, p in encoder_d.named_parameters())
    assert all((text_params[n] - p).abs().max() <= 1e-7 for n, p in encoder_d.named_parameters())
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([700, 90]), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert rel(student(x, t, ctx, transformer_options={}), unet_d(x, t, encoder_hidden_states=ctx).sample) < 2e-5


def test_gradients_reach_comfyuis_text_encoder(tiny):
    from forgedit_ops.finetune import trainable_copy

    clip = tiny["clip"]
    tokens = clip.tokenize(FINETUNE["source_prompt"])
    with torch.inference_mode():
        e = clip.encode_from_tokens(tokens)
    comfy.model_management.load_models_gpu([clip.patcher], force_full_load=True)
    encoder, params = trainable_copy(clip.cond_stage_model, lambda k: True, torch.device("cpu"))
    assert set(params) == set(clip.patcher.model_state_dict())
    out = text_encoder().differentiable(encoder).encode_token_weights(tokens)[0]
    assert torch.equal(out, e)
    out.square().sum().backward()
    assert {k for k, p in params.items() if p.grad is None} == {k for k in params if not text_encoder().in_text_model(k)}


def text_encoder():
    """The pack's nodes/text_encoder.py as ComfyUI loaded it."""
    import sys
    from find_comfyui import PACK

    return sys.modules[str(PACK).replace(".", "_x_") + ".nodes.text_encoder"]


@pytest.fixture(scope="module")
def learned(tiny):
    base_clip = {k: v.clone() for k, v in tiny["clip"].cond_stage_model.state_dict().items()}
    result, clip = run_node("ForgeditDreamBooth", model=tiny["model"], clip=tiny["clip"], vae=tiny["vae"],
                            image=tiny["image"], **{**DREAMBOOTH, "samples": 120, "unet_lr": 3e-4, "text_lr": 3e-4})
    return result, clip, base_clip


def test_dreambooth_learns_and_leaves_model_and_clip_untouched(tiny, learned):
    result, clip, base_clip = learned
    assert len(result.deltas) == 686 and result.metadata["method"] == "dreambooth-forgedit"
    source, = run_node("CLIPTextEncode", clip=tiny["clip"], text=FINETUNE["source_prompt"])
    tuned, = run_node("CLIPTextEncode", clip=clip, text=FINETUNE["source_prompt"])
    assert torch.allclose(tuned[0][0], result.source_embedding, atol=1e-5)
    assert not torch.allclose(tuned[0][0], source[0][0], atol=1e-3)
    empty, = run_node("CLIPTextEncode", clip=clip, text="")
    assert torch.allclose(empty[0][0], result.uncond_embedding, atol=1e-5)

    edited, = run_node("ForgeditForget", model=tiny["model"], result=result, strategy="donotforget", degree=0.0)
    z0 = tiny["model"].model.process_latent_in(image_latent(tiny))
    before = reconstruction_loss(tiny["model"], z0, source[0][0])
    after = reconstruction_loss(edited, z0, result.source_embedding)
    assert after < 0.5 * before
    losses = result.metadata["losses"]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])

    comfy.model_management.unload_all_models()
    now = tiny["clip"].cond_stage_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base_clip.items())
    assert_base_untouched(tiny)


def test_a_saved_result_keeps_its_text_encoder(tiny, learned, folders):
    result, clip, _ = learned
    assert result.text_deltas
    run_output_node("ForgeditSave", result=result, filename_prefix="dreambooth", dtype="fp32")
    loaded = load("dreambooth_00001_.safetensors")
    assert loaded.text_deltas.keys() == result.text_deltas.keys()
    assert all(torch.equal(loaded.text_deltas[k], d) for k, d in result.text_deltas.items())
    reloaded, = run_node("ForgeditTextEncoder", result=loaded, clip=tiny["clip"])
    ours, = run_node("CLIPTextEncode", clip=reloaded, text="a green triangle")
    fresh, = run_node("CLIPTextEncode", clip=clip, text="a green triangle")
    assert torch.equal(ours[0][0], fresh[0][0])


def test_text_encoder_node_needs_a_dreambooth_result(tiny, finetuned):
    with pytest.raises(ValueError, match="only Forgedit DreamBooth trains one"):
        run_node("ForgeditTextEncoder", result=finetuned, clip=tiny["clip"])


def test_dreambooth_disk_cache_restores_the_text_encoder(tiny, folders):
    inputs = dict(model=tiny["model"], clip=tiny["clip"], vae=tiny["vae"], image=tiny["image"], **DREAMBOOTH,
                  disk_cache=True)
    first, first_clip = run_node("ForgeditDreamBooth", **inputs)
    second, second_clip = run_node("ForgeditDreamBooth", **inputs)
    assert second.metadata == first.metadata
    a, = run_node("CLIPTextEncode", clip=first_clip, text="a green triangle")
    b, = run_node("CLIPTextEncode", clip=second_clip, text="a green triangle")
    assert torch.equal(a[0][0], b[0][0])
    assert all(torch.equal(second.deltas[k], d) for k, d in first.deltas.items())


def test_dreambooth_forgetting_resets_blocks_zero(tiny, learned):
    result, _, _ = learned
    edited, = run_node("ForgeditForget", model=tiny["model"], result=result, strategy="dreambooth: nodecoder", degree=0.0)
    comfy.model_management.load_models_gpu([edited], force_full_load=True)
    merged = {k: v.clone() for k, v in edited.model.diffusion_model.state_dict().items()}
    comfy.model_management.unload_all_models()
    for key, delta in result.deltas.items():
        forgotten = key.startswith("output_blocks.")
        assert torch.equal(merged[key], tiny["base"][key] if forgotten else tiny["base"][key] + delta)
    assert_base_untouched(tiny)


@pytest.mark.parametrize("overrides, message", [
    ({"image": torch.rand(2, 64, 64, 3)}, "batch of 2"),
    ({"width": 100}, "multiples of 8"),
    ({"source_prompt": ""}, "source_prompt is empty"),
    ({"samples": 3}, "at least batch_size"),
])
def test_dreambooth_rejects_bad_input(tiny, overrides, message):
    inputs = {**dict(model=tiny["model"], clip=tiny["clip"], vae=tiny["vae"], image=tiny["image"]), **DREAMBOOTH, **overrides}
    with pytest.raises(ValueError, match=message):
        run_node("ForgeditDreamBooth", **inputs)
