"""The Prompt-to-Prompt / P2Plus edit loop (Hertz et al. 2022, §3; StyleDiffusion, Li et al. 2023, §3.3): source and
targets denoised together from the inversion's x_T by guided DDIM, the controller's state per step, LocalBlend after
each step (§3.2, "local editing")."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .ddim import abar_before, ddim_prev, guided, inversion_timesteps
from .p2p import blend, local_blend_mask
from .p2p_control import EditStep

# eps(z (B, 4, h, w), t, uncond rows, cond rows, step, film) -> (ε_∅, ε_c), each (B, 4, h, w)
EditEps = Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor, EditStep, Optional[tuple]], tuple]


@dataclass
class LocalBlend:
    """§3.2's local editing: each item's blend-word weights (B, 77), the mask threshold and the first step it acts at."""
    words: torch.Tensor
    threshold: float
    begins: int


def p2p_sample(eps: EditEps, x_T: torch.Tensor, context: torch.Tensor, uncond: Callable[[int], torch.Tensor],
               abar: torch.Tensor, steps: int, guidance: float, step_state: Callable[[int], tuple],
               local_blend: Optional[LocalBlend] = None, callback: Optional[Callable[[int], None]] = None):
    """Guided DDIM from x_T for the B prompts of `context` (item 0 the source) over the reference's timesteps: at step
    i the controller step_state(i) = (EditStep, film or None) acts inside the UNet, the unconditional rows are
    uncond(i) (the empty prompt, or null-text's ∅_i), and LocalBlend (when given) pulls each target outside its mask
    back to the source from its first step on, from the maps summed over all steps so far."""
    stride = len(abar) // steps
    z = x_T.expand(context.shape[0], -1, -1, -1).clone()
    totals = None
    for i, t in enumerate(inversion_timesteps(steps, len(abar))[::-1]):
        step, film = step_state(i)
        step.store = [] if local_blend is not None else None
        eps_u, eps_c = eps(z, t, uncond(i), context, step, film)
        z = ddim_prev(guided(eps_u, eps_c, guidance), z, abar[t], abar_before(abar, t, stride))
        if local_blend is not None and step.store:
            totals = step.store if totals is None else [a + b for a, b in zip(totals, step.store)]
            if i >= local_blend.begins:
                z = blend(z, local_blend_mask(totals, local_blend.words, local_blend.threshold, z.shape[-2:]))
        if callback is not None:
            callback(i)
    return z
