"""Parity with an independent implementation: diffusers' UNet2DConditionModel and DDIMScheduler on the same weights,
for the SD 1.x ε layout and the SD 2.x v-prediction layout (linear projections, 64-channel heads, scaled down here).
Recipes and tolerances: shared/docs/parity-notes.md (about 10x over what was measured)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import run_node
from tiny_models import SD2_HEAD_CHANNELS, init_weights, tiny_model, tiny_sd2_model

LR_UNET, LR_TEXT = 6e-5, 1e-3
FAMILIES = ["sd1-eps", "sd2-v"]


def diffusers_unet(width: int, context: int, seed: int, family: str = "sd1-eps"):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    channels = (width, 2 * width, 4 * width, 4 * width)
    sd2 = family == "sd2-v"
    unet = UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=2, cross_attention_dim=context,
        attention_head_dim=tuple(c // SD2_HEAD_CHANNELS for c in channels) if sd2 else 8,  # diffusers: heads per block
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32, norm_eps=1e-5,
        flip_sin_to_cos=True, freq_shift=0, use_linear_projection=sd2, sample_size=16)
    return init_weights(unet, seed, perturb_norms=True).eval()


def diffusers_ddim(family: str = "sd1-eps"):
    """The reference's scheduler, predicting what the family's UNet predicts."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, prediction_type="v_prediction" if family == "sd2-v" else "epsilon")


def comfy_twin(unet_d, width: int, context: int, family: str = "sd1-eps"):
    """A ComfyUI MODEL of the family's layout holding the diffusers weights (loaded under inference mode, like a
    checkpoint)."""
    import comfy.utils

    with torch.inference_mode():
        model = tiny_sd2_model(width, context) if family == "sd2-v" else tiny_model(width, context)
        to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
        sd = {to_ldm[k]: v for k, v in unet_d.state_dict().items()}
        model.model.diffusion_model.load_state_dict(sd, strict=True)
    return model, to_ldm


def diffusers_trained(name: str) -> bool:
    """The reference's rule (Forgedit §3), on diffusers names."""
    return ("down_blocks" in name and "down_blocks.0" not in name) or ("up_blocks" in name and "up_blocks.0" not in name)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=FAMILIES)
def pair64(comfy, request):
    unet_d = diffusers_unet(64, 32, seed=7, family=request.param)
    model, to_ldm = comfy_twin(unet_d, 64, 32, request.param)
    return unet_d, model, to_ldm, request.param


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_output_matches_diffusers(comfy, family):
    unet_d = diffusers_unet(32, 32, seed=3, family=family)
    model, _ = comfy_twin(unet_d, 32, 32, family)
    x, t, ctx = torch.randn(4, 4, 16, 16), torch.tensor([999, 500, 37, 0]), torch.randn(4, 77, 32)
    with torch.no_grad():
        ref = unet_d(x, t, encoder_hidden_states=ctx).sample
    with torch.inference_mode():
        ours = model.model.diffusion_model(x, t, ctx, transformer_options={})
    assert rel(ours, ref) < 1e-5


def test_one_joint_step_matches_diffusers(comfy, pair64):
    from forgedit_ops.finetune import FinetuneConfig, joint_finetune, trainable_copy
    from forgedit_ops.forgetting import is_trained
    from forgedit_ops.schedule import alphas_cumprod

    unet_d, model, to_ldm, family = pair64
    z0, e_src, seed = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32), 11
    cfg = FinetuneConfig(samples=3, batch_size=3, unet_lr=LR_UNET, text_lr=LR_TEXT, seed=seed,
                         prediction=pack_prediction(comfy, model, family))

    # ours: the ComfyUI UNet through forgedit_ops, as the fine-tune node runs it
    base = model.model.diffusion_model
    student, params = trainable_copy(base, is_trained, torch.device("cpu"))
    abar = alphas_cumprod(model.get_model_object("model_sampling").sigmas)
    e_ours, losses = joint_finetune(lambda x, t, c: student(x, t, c, transformer_options={}), params, e_src, z0, abar, cfg)

    # reference: diffusers, written out as the Forgedit pipeline does it (diffusers' train_dreambooth target for v)
    sched = diffusers_ddim(family)
    trained_d = {n: p for n, p in unet_d.named_parameters() if diffusers_trained(n)}
    before_d = {n: p.detach().clone() for n, p in trained_d.items()}
    unet_d.requires_grad_(False)
    for p in trained_d.values():
        p.requires_grad_(True)
    e_ref = torch.nn.Parameter(e_src.clone())
    opt = torch.optim.Adam([{"params": list(trained_d.values()), "lr": LR_UNET}, {"params": [e_ref], "lr": LR_TEXT}])
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (3,), generator=g)
    noise = torch.randn((3, 4, 16, 16), generator=g)
    out = unet_d(sched.add_noise(z0.repeat(3, 1, 1, 1), noise, t), t, encoder_hidden_states=e_ref.repeat(3, 1, 1)).sample
    target = sched.get_velocity(z0.repeat(3, 1, 1, 1), noise, t) if family == "sd2-v" else noise
    loss = F.mse_loss(out, target)
    loss.backward()
    opt.step()

    assert set(params) == {to_ldm[n] for n in trained_d} and len(params) == 518
    assert abs(losses[0] - loss.item()) <= 1e-5 * loss.item()
    g_ref = {to_ldm[n]: p.grad for n, p in trained_d.items()}
    g_max = max(v.abs().max() for v in g_ref.values())
    assert max((params[k].grad - g_ref[k]).abs().max() for k in params) <= 1e-5 * g_max
    assert (e_ours - e_ref.detach()).abs().max() <= 1e-5

    meaningful = outside = total = 0
    for n, p in trained_d.items():
        k = to_ldm[n]
        diff = ((params[k].detach() - base.state_dict()[k]) - (p.detach() - before_d[n])).abs()
        strong = g_ref[k].abs() > 1e-6
        meaningful = max(meaningful, diff[strong].max().item() if strong.any() else 0.0)
        outside += (diff > 1e-3 * LR_UNET).sum().item()
        total += diff.numel()
    assert meaningful <= 1e-3 * LR_UNET
    assert outside <= 0.005 * total

    x, tt, ctx = torch.randn(2, 4, 16, 16), torch.tensor([700, 90]), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert rel(student(x, tt, ctx, transformer_options={}), unet_d(x, tt, encoder_hidden_states=ctx).sample) < 2e-5


def pack_prediction(comfy, model, family: str) -> str:
    """What the pack reads off the MODEL (as the fine-tune nodes do), checked against the family."""
    prediction = comfy.pack.nodes.common.prediction_type(model)
    assert prediction == family.split("-")[1]
    return prediction


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_schedule_matches_diffusers_ddim(comfy, tiny, family):
    pack = comfy.pack
    unet_d = diffusers_unet(32, 32, seed=5, family=family)
    model, _ = comfy_twin(unet_d, 32, 32, family)
    e_src, uncond, seed = torch.randn(1, 77, 32), torch.randn(1, 77, 32), 42
    base_fp = pack.nodes.common.unet_fingerprint(pack.nodes.common.loaded_unet(model))
    key = "output_blocks.3.1.proj_out.weight"
    zero = torch.zeros_like(model.model.diffusion_model.state_dict()[key])
    result = pack.forgedit_ops.result.ForgeditResult({key: zero}, e_src, uncond,
                                                     {"base_fingerprint": base_fp, "width": 128, "height": 128})
    edited, = run_node("ForgeditForget", model=model, result=result, strategy="donotforget", degree=0.0)
    latent, _, _, _ = run_node("ForgeditSampler", model=edited, result=result, target=[[torch.randn(1, 77, 32), {}]],
                            vae=tiny["vae"], mode="vs", gammas="0", alphas="0.7", seeds=str(seed), steps=50, cfg=7.5,
                            sampler_name="ddim", scheduler="forgedit_reference", batch_size=8)

    sched = diffusers_ddim(family)
    sched.set_timesteps(50)
    z = torch.randn((1, 4, 16, 16), generator=torch.manual_seed(seed)) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eu, ec = unet_d(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, e_src])).sample.chunk(2)
            z = sched.step(eu + 7.5 * (ec - eu), t, z, eta=0.0).prev_sample
    assert rel(latent["samples"] * 0.18215, z) < 1e-4
