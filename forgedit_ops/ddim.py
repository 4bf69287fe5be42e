"""Deterministic DDIM (Song et al. 2021, eq. 12 with η = 0) as the inversion methods use it: the reverse step, its
inversion along the same trajectory, and the inversion loop over the reference's leading timesteps (null-text
inversion, Mokady et al. 2023, §3; StyleDiffusion, Li et al. 2023, §3)."""
from typing import Callable, Optional

import torch

from .schedule import leading_timesteps

EpsFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


def predicted_x0(eps: torch.Tensor, z: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """DDIM's x̂₀ = (z − √(1 − ᾱ_t)·ε) / √ᾱ_t."""
    return (z - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def ddim_prev(eps: torch.Tensor, z: torch.Tensor, abar_t: torch.Tensor, abar_prev: torch.Tensor) -> torch.Tensor:
    """One reverse step t → t − r: √ᾱ_{t−r}·x̂₀ + √(1 − ᾱ_{t−r})·ε (Song et al. eq. 12, σ = 0)."""
    return abar_prev.sqrt() * predicted_x0(eps, z, abar_t) + (1 - abar_prev).sqrt() * eps


def ddim_next(eps: torch.Tensor, z: torch.Tensor, abar_t: torch.Tensor, abar_prev: torch.Tensor) -> torch.Tensor:
    """The inverse step t − r → t with ε evaluated at t on the current latent (null-text inversion §3):
    √ᾱ_t·(z − √(1 − ᾱ_{t−r})·ε)/√ᾱ_{t−r} + √(1 − ᾱ_t)·ε."""
    return abar_t.sqrt() * predicted_x0(eps, z, abar_prev) + (1 - abar_t).sqrt() * eps


def inversion_timesteps(steps: int, train_steps: int = 1000) -> list[int]:
    """The reference's timesteps, ascending for inversion: T = 50 gives 0, 20, …, 980; T = 30 gives 0, 33, …, 957."""
    return leading_timesteps(steps, train_steps)[::-1]


def abar_before(abar: torch.Tensor, t: int, stride: int) -> torch.Tensor:
    """ᾱ one step below t; below 0 it is ᾱ₀ (the reference's final ᾱ, set_alpha_to_one off)."""
    return abar[t - stride] if t - stride >= 0 else abar[0]


def ddim_invert(eps_fn: EpsFn, z0: torch.Tensor, context: torch.Tensor, abar: torch.Tensor, steps: int,
                callback: Optional[Callable[[int], None]] = None) -> list[torch.Tensor]:
    """DDIM inversion with the source prompt's ε and no guidance: z₀ … z_T, the T + 1 latents the edit starts from
    (z_T) and the optimisations reconstruct (null-text inversion §3, eq. 3). z₁ = z₀, as in the reference."""
    stride = len(abar) // steps
    latents = [z0]
    for k, t in enumerate(inversion_timesteps(steps, len(abar))):
        eps = eps_fn(latents[-1], t, context)
        latents.append(ddim_next(eps, latents[-1], abar[t], abar_before(abar, t, stride)))
        if callback is not None:
            callback(k)
    return latents


def guided(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2021): ε_∅ + w·(ε_c − ε_∅)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def ddim_sample(eps_fn: EpsFn, x_T: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor, abar: torch.Tensor,
                steps: int, guidance: float, callback: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """The reference's guided DDIM denoising from x_T over the same timesteps (descending), no noise: the
    reconstruction a plain inversion gives under guidance."""
    stride = len(abar) // steps
    z = x_T
    for i, t in enumerate(inversion_timesteps(steps, len(abar))[::-1]):
        eps = guided(eps_fn(z, t, uncond), eps_fn(z, t, context), guidance)
        z = ddim_prev(eps, z, abar[t], abar_before(abar, t, stride))
        if callback is not None:
            callback(i)
    return z
