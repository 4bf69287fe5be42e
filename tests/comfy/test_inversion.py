"""DDIM inversion of a real ComfyUI UNet against diffusers as the oracle: the same weights through diffusers'
UNet2DConditionModel and DDIMInverseScheduler give the same 31 latents (T = 30, the StyleDiffusion reference)."""
import torch
from forgedit_ops.ddim import ddim_invert
from forgedit_ops.schedule import alphas_cumprod
from test_parity import comfy_twin, diffusers_unet, rel


def diffusers_inversion(unet, z0, context, steps):
    from diffusers import DDIMInverseScheduler

    sched = DDIMInverseScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                 set_alpha_to_one=False)
    sched.set_timesteps(steps)
    latents = [z0]
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(latents[-1], t, encoder_hidden_states=context).sample
            latents.append(sched.step(eps, t, latents[-1]).prev_sample)
    return sched.timesteps.tolist(), latents


def test_the_31_inversion_latents_match_diffusers(comfy):
    unet_d = diffusers_unet(32, 32, seed=5)
    model, _ = comfy_twin(unet_d, 32, 32)
    g = torch.Generator().manual_seed(2)
    z0, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    timesteps, reference = diffusers_inversion(unet_d, z0, context, 30)
    abar = alphas_cumprod(model.get_model_object("model_sampling").sigmas).float()
    unet = model.model.diffusion_model
    seen = []

    def eps_fn(z, t, c):
        seen.append(t)
        return unet(z, torch.tensor([t]), c, transformer_options={})

    with torch.inference_mode():
        ours = ddim_invert(eps_fn, z0, context, abar, 30)
    assert seen == timesteps and seen[-1] == 957 and len(ours) == 31
    assert rel(ours[1], z0) < 1e-6  # the first step, at t = 0, stays at ᾱ₀
    assert max(rel(a, b) for a, b in zip(ours, reference)) < 1e-4


def test_one_null_text_step_matches_diffusers(comfy):
    from diffusers import DDIMScheduler
    from forgedit_ops.finetune import trainable_copy
    from forgedit_ops.nulltext import null_text_optimize

    unet_d = diffusers_unet(32, 32, seed=6).requires_grad_(False)
    model, _ = comfy_twin(unet_d, 32, 32)
    student, _ = trainable_copy(model.model.diffusion_model, lambda k: False, torch.device("cpu"))
    g = torch.Generator().manual_seed(4)
    z0, z_prev, z_t = (torch.randn(1, 4, 16, 16, generator=g) for _ in range(3))
    context, empty = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    abar = alphas_cumprod(model.get_model_object("model_sampling").sigmas).float()
    losses = []
    nulls, _ = null_text_optimize(lambda z, t, c: student(z, torch.tensor([t]), c, transformer_options={}),
                               [z0, z_prev, z_t], context, empty, abar, inner_steps=1,
                               callback=lambda i, loss: losses.append(loss))

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    sched.set_timesteps(2)
    t = sched.timesteps[0]
    null = empty.clone().requires_grad_(True)
    opt = torch.optim.Adam([null], lr=1e-2)
    with torch.no_grad():
        eps_c = unet_d(z_t, t, encoder_hidden_states=context).sample
    eps_u = unet_d(z_t, t, encoder_hidden_states=null).sample
    loss = torch.nn.functional.mse_loss(sched.step(eps_u + 7.5 * (eps_c - eps_u), t, z_t).prev_sample, z_prev)
    loss.backward()
    opt.step()
    assert int(t) == 500 and abs(losses[0] - loss.item()) < 1e-5 * loss.item()
    assert rel(nulls[0] - empty, null.detach() - empty) < 1e-4
