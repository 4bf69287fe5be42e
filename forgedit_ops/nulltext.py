"""Null-text optimisation (Mokady et al. 2023, §3.2, Algorithm 1): per step, the unconditional embedding ∅_t that
makes the guided DDIM step land on the inversion's latent."""
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .ddim import EpsFn, abar_before, ddim_prev, guided, inversion_timesteps


def null_text_lr(i: int) -> float:
    """Algorithm 1's learning rate with the reference's decay: 1e-2 · (1 − i/100)."""
    return 1e-2 * (1 - i / 100)


def null_text_optimize(eps_fn: EpsFn, latents: list[torch.Tensor], context: torch.Tensor, uncond: torch.Tensor,
                       abar: torch.Tensor, guidance: float = 7.5, inner_steps: int = 10, early_stop: float = 1e-5,
                       callback: Optional[Callable[[int, float], None]] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Algorithm 1 over the inversion's latents z₀ … z_T: at step i (t descending) ∅ starts from step i−1's optimum and
    takes up to `inner_steps` Adam steps on ‖z_{t−1} − DDIM(z̄_t, ∅, c)‖², stopping once the loss is below
    early_stop + 2e-5·i (the reference's schedule); z̄ then moves on with the optimised ∅. Returns ∅ per step and the
    latent z̄ ends at (the reconstruction)."""
    steps = len(latents) - 1
    stride = len(abar) // steps
    z, null, nulls = latents[-1], uncond.detach(), []
    for i, t in enumerate(inversion_timesteps(steps, len(abar))[::-1]):
        abar_t, abar_prev = abar[t], abar_before(abar, t, stride)
        target = latents[steps - i - 1]
        with torch.no_grad():
            eps_cond = eps_fn(z, t, context)
        null = null.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([null], lr=null_text_lr(i))
        for _ in range(inner_steps):
            loss = F.mse_loss(ddim_prev(guided(eps_fn(z, t, null), eps_cond, guidance), z, abar_t, abar_prev), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < early_stop + i * 2e-5:
                break
        null = null.detach()
        nulls.append(null)
        with torch.no_grad():
            z = ddim_prev(guided(eps_fn(z, t, null), eps_cond, guidance), z, abar_t, abar_prev)
        if callback is not None:
            callback(i, loss.item())
    return nulls, z
