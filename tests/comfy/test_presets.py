"""Training presets against the reference's fp32 (README: 'fast' and 'low memory' within 5% relative ε of fp32), and
micro-batching / the fused Adam step as the same mathematics."""
import comfy.model_management
import pytest
import torch
from conftest import run_node
from tiny_models import sample_image, tiny_clip, tiny_model, tiny_vae

SETTINGS = dict(source_prompt="a red disc", width=64, height=64, samples=40, batch_size=10, unet_lr=6e-5, text_lr=1e-3,
                seed=0, early_stop=False)
PROBE = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900, 500, 100, 10])


@pytest.fixture(scope="module")
def w64(comfy):
    with torch.inference_mode():
        return tiny_model(64), tiny_clip(), tiny_vae()


def finetune(w64, preset):
    model, clip, vae = w64
    result, = run_node("ForgeditFinetune", model=model, clip=clip, vae=vae, image=sample_image(), precision=preset, **SETTINGS)
    return result


def eps_after(model, result, context):
    """ε of the fine-tuned UNet (through Forgedit Forget) on fixed probe inputs."""
    edited, = run_node("ForgeditForget", model=model, result=result, strategy="donotforget", degree=0.0)
    comfy.model_management.load_models_gpu([edited], force_full_load=True)
    with torch.inference_mode():
        eps = edited.model.diffusion_model(PROBE[0], PROBE[1], context.expand(4, -1, -1), transformer_options={})
    comfy.model_management.unload_all_models()
    return eps


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def by_preset(w64):
    return {p: finetune(w64, p) for p in ("exact", "fast", "low memory")}


def test_exact_is_fp32_and_auto_picks_a_precision(by_preset):
    assert by_preset["exact"].metadata["precision"] == "fp32"
    assert by_preset["fast"].metadata["precision"] in ("bf16", "fp16", "fp32")


@pytest.mark.parametrize("preset", ["fast", "low memory"])
def test_presets_stay_within_tolerance_of_fp32(w64, by_preset, preset):
    exact, ours = by_preset["exact"], by_preset[preset]
    context = exact.source_embedding
    eps_exact, eps_ours = eps_after(w64[0], exact, context), eps_after(w64[0], ours, context)
    comfy.model_management.load_models_gpu([w64[0]], force_full_load=True)
    with torch.inference_mode():
        eps_base = w64[0].model.diffusion_model(PROBE[0], PROBE[1], context.expand(4, -1, -1), transformer_options={})
    assert rel(eps_ours, eps_exact) < 0.05
    assert rel(eps_ours, eps_exact) < 0.1 * rel(eps_exact, eps_base)
    assert (ours.source_embedding - exact.source_embedding).abs().max() < 0.01
    e_init, = run_node("CLIPTextEncode", clip=w64[1], text=SETTINGS["source_prompt"])
    moved = (exact.source_embedding - e_init[0][0]).norm()
    assert (ours.source_embedding - exact.source_embedding).norm() < 0.1 * moved  # measured 3 %
    assert ours.metadata["losses"] == pytest.approx(exact.metadata["losses"], rel=1e-2)
    off = sum((ours.deltas[k] - d).square().sum() for k, d in exact.deltas.items()).sqrt()
    assert off < 0.25 * sum(d.square().sum() for d in exact.deltas.values()).sqrt()  # measured 12 % for fast


def test_low_memory_differs_from_fast_only_by_its_8bit_and_bf16_adam_moments(w64, by_preset):
    fast, low = by_preset["fast"], by_preset["low memory"]
    context = fast.source_embedding
    assert rel(eps_after(w64[0], low, context), eps_after(w64[0], fast, context)) < 0.01
    assert (low.source_embedding - fast.source_embedding).abs().max() < 1e-3


def test_micro_batches_and_fused_step_are_the_same_mathematics(w64):
    from forgedit_ops.finetune import FinetuneConfig, joint_finetune, trainable_copy
    from forgedit_ops.forgetting import is_trained
    from forgedit_ops.schedule import alphas_cumprod

    model = w64[0]
    abar = alphas_cumprod(model.get_model_object("model_sampling").sigmas)
    z0, e_src = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)

    def train(**options):
        student, params = trainable_copy(model.model.diffusion_model, is_trained, torch.device("cpu"))
        cfg = FinetuneConfig(samples=20, batch_size=4, seed=3, **options)
        e, losses = joint_finetune(lambda x, t, c: student(x, t, c, transformer_options={}), params, e_src, z0, abar, cfg)
        with torch.no_grad():
            return student(PROBE[0], PROBE[1], e.expand(4, -1, -1), transformer_options={}), e, losses

    whole, micro, fused = train(), train(micro_batch=1), train(fused_step=True)
    for same in (micro, fused):
        assert rel(same[0], whole[0]) < 2e-5 and (same[1] - whole[1]).abs().max() < 1e-5
        assert same[2] == pytest.approx(whole[2], rel=1e-5)
    with pytest.raises(ValueError, match="fused_step needs the whole batch"):
        train(micro_batch=2, fused_step=True)


def test_training_reads_frozen_weights_in_place(w64):
    """bf16 autocast reads the fp32 weights in place; fp32 reads them through ordinary tensors on their storage, even
    when they are inference tensors (a MODEL loaded inside a prompt), and backward still works."""
    from forgedit_ops.finetune import trainable_copy
    from forgedit_ops.forgetting import is_trained

    unet = w64[0].model.diffusion_model
    with torch.inference_mode():
        loaded = {k: p.clone() for k, p in unet.named_parameters()}
    for dtype in (torch.bfloat16, torch.float32):
        copy, params = trainable_copy(unet, is_trained, torch.device("cpu"), dtype)
        student, base = dict(copy.named_parameters()), dict(unet.named_parameters())
        frozen = [k for k, p in base.items() if p.dim() > 1 and k not in params]
        assert frozen and all(student[k].data_ptr() == base[k].data_ptr() for k in frozen)
        assert all(student[k].data_ptr() != base[k].data_ptr() and student[k].dtype == torch.float32 for k in params)
    inference = torch.nn.Linear(4, 4)
    with torch.inference_mode():
        inference.weight = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    copy, _ = trainable_copy(inference, lambda name: False, torch.device("cpu"))
    x = torch.randn(2, 4, requires_grad=True)
    copy(x).sum().backward()
    assert copy.weight.data_ptr() == inference.weight.data_ptr() and x.grad is not None
    assert all(torch.equal(p, loaded[k]) for k, p in unet.named_parameters())
