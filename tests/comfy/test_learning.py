"""Learning on tiny real models, SD 1.x ε and SD 2.x v-prediction: the fine-tune lowers the reconstruction loss, and
γ = 0 samples approach the image."""
import comfy.model_management
import pytest
import torch
from conftest import FINETUNE, assert_base_untouched, run_node
from forgedit_ops.finetune import draw_noise_and_timesteps, q_sample, velocity
from forgedit_ops.schedule import alphas_cumprod


@pytest.fixture(scope="module", params=["tiny", "tiny_v"])
def family(request):
    """The tiny objects of one family (SD 1.x ε, SD 2.x v)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def learned(family):
    tiny = family
    result, = run_node("ForgeditFinetune", model=tiny["model"], clip=tiny["clip"], vae=tiny["vae"], image=tiny["image"],
                       **{**FINETUNE, "samples": 240, "batch_size": 4, "unet_lr": 5e-4, "text_lr": 5e-3})
    edited, = run_node("ForgeditForget", model=tiny["model"], result=result, strategy="donotforget", degree=0.0)
    return result, edited


def image_latent(tiny):
    with torch.inference_mode():
        return tiny["vae"].encode(tiny["image"])


def reconstruction_loss(model, z0, embedding, draws=64, prediction="eps"):
    """ε- or v-MSE on fixed (t, ε) draws, the fine-tune's own objective."""
    noise, t = draw_noise_and_timesteps(torch.Generator().manual_seed(1234), draws, z0.shape[1:])
    abar = alphas_cumprod(model.get_model_object("model_sampling").sigmas).float()
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    with torch.inference_mode():
        eps = model.model.diffusion_model(q_sample(z0, noise, abar[t]), t, embedding.expand(draws, -1, -1),
                                          transformer_options={})
    target = noise if prediction == "eps" else velocity(z0, noise, abar[t])
    return torch.nn.functional.mse_loss(eps, target).item()


def test_finetune_lowers_the_reconstruction_loss(family, learned):
    tiny, (result, edited) = family, learned
    z0 = tiny["model"].model.process_latent_in(image_latent(tiny))
    source, = run_node("CLIPTextEncode", clip=tiny["clip"], text=FINETUNE["source_prompt"])
    prediction = result.metadata["prediction"]
    assert prediction == {"EPS": "eps", "V_PREDICTION": "v"}[tiny["model"].model.model_type.name]
    before = reconstruction_loss(tiny["model"], z0, source[0][0], prediction=prediction)
    after = reconstruction_loss(edited, z0, result.source_embedding, prediction=prediction)
    losses = result.metadata["losses"]
    assert after < 0.5 * before
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert_base_untouched(tiny)


def test_gamma_zero_samples_approach_the_image(family, learned):
    tiny, (result, edited) = family, learned
    target, = run_node("CLIPTextEncode", clip=tiny["clip"], text="a green triangle")
    source, = run_node("CLIPTextEncode", clip=tiny["clip"], text=FINETUNE["source_prompt"])
    negative, = run_node("CLIPTextEncode", clip=tiny["clip"], text="")
    z = image_latent(tiny)
    ours, _, _, _ = run_node("ForgeditSampler", model=edited, result=result, target=target, vae=tiny["vae"], mode="vs",
                          gammas="0", alphas="0.7", seeds="0, 1, 2", steps=20, cfg=1.0, sampler_name="ddim",
                          scheduler="forgedit_reference", batch_size=3)
    base_errors = []
    for seed in (0, 1, 2):
        empty, = run_node("EmptyLatentImage", width=64, height=64, batch_size=1)
        base, = run_node("KSampler", model=tiny["model"], seed=seed, steps=20, cfg=1.0, sampler_name="ddim",
                         scheduler="ddim_uniform", positive=source, negative=negative, latent_image=empty, denoise=1.0)
        base_errors.append((base["samples"] - z).pow(2).mean().item())
    ours_error = (ours["samples"] - z).pow(2).mean().item()
    assert ours_error < 0.5 * min(base_errors)
    assert_base_untouched(tiny)
