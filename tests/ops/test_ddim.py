"""DDIM inversion and null-text optimisation on plain tensors (no ComfyUI): the steps invert each other, inversion and
sampling retrace one trajectory when ε does not depend on the latent, and the optimised null texts undo the drift
that guidance adds."""
import torch
from forgedit_ops.ddim import ddim_invert, ddim_next, ddim_prev, guided, inversion_timesteps
from forgedit_ops.nulltext import null_text_lr, null_text_optimize

ABAR = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0).float()
X0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
MIX = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)) * 0.05


def exact_eps(z, t):
    """The ε of a data distribution that is the single point X0: what a perfect model predicts."""
    return (z - ABAR[t].sqrt() * X0) / (1 - ABAR[t]).sqrt()


def eps_fn(z, t, context):
    """The exact ε plus a text-dependent shift, so guidance pulls away from the data."""
    return exact_eps(z, t) + (MIX @ context.mean(1).T).view(1, 4, 1, 1)


def test_the_inverse_step_undoes_the_step():
    z, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    back = ddim_prev(eps, ddim_next(eps, z, ABAR[500], ABAR[480]), ABAR[500], ABAR[480])
    assert torch.allclose(back, z, atol=1e-5)


def test_reference_timesteps():
    assert inversion_timesteps(50)[:2] == [0, 20] and inversion_timesteps(50)[-1] == 980
    assert inversion_timesteps(30)[-1] == 957 and len(inversion_timesteps(30)) == 30


def test_a_latent_independent_model_inverts_and_reconstructs_exactly():
    """With ε independent of z, inversion and sampling use the same ε at every step: they retrace one trajectory, which
    checks which ᾱ pairs each step uses."""
    noise = torch.randn(1, 4, 8, 8)
    z0 = ABAR[0].sqrt() * X0 + (1 - ABAR[0]).sqrt() * noise
    context = torch.zeros(1, 77, 8)
    seen = []
    latents = ddim_invert(lambda z, t, c: noise, z0, context, ABAR, 10, seen.append)
    assert len(latents) == 11 and seen == list(range(10)) and torch.allclose(latents[1], z0, atol=1e-6)
    assert torch.allclose(latents[-1], ABAR[900].sqrt() * X0 + (1 - ABAR[900]).sqrt() * noise, atol=1e-5)
    z = latents[-1]
    for i, t in enumerate(inversion_timesteps(10)[::-1]):
        z = ddim_prev(noise, z, ABAR[t], ABAR[t - 100] if t >= 100 else ABAR[0])
        assert torch.allclose(z, latents[9 - i], atol=1e-5)


def test_optimised_null_texts_reconstruct_what_plain_guidance_misses():
    context, empty = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(2)), torch.zeros(1, 77, 8)
    z0 = ABAR[0].sqrt() * X0
    latents = ddim_invert(eps_fn, z0, context, ABAR, 10)
    lrs = []
    nulls, _ = null_text_optimize(eps_fn, latents, context, empty, ABAR, callback=lambda i, loss: lrs.append(i))
    assert len(nulls) == 10 and lrs == list(range(10)) and null_text_lr(50) == 5e-3

    def reconstruct(uncond):
        z = latents[-1]
        for i, t in enumerate(inversion_timesteps(10)[::-1]):
            eps = guided(eps_fn(z, t, uncond[i]), eps_fn(z, t, context), 7.5)
            z = ddim_prev(eps, z, ABAR[t], ABAR[t - 100] if t >= 100 else ABAR[0])
        return (z - z0).norm()

    assert reconstruct(nulls) < 0.5 * reconstruct([empty] * 10)
