"""StyleDiffusion (Li et al. 2023, arXiv 2303.15649): per-step mapping networks M_t that turn the image features E(x)
into the value input c̃_t = c⊙γ_t + β_t of every cross-attention layer (§3.1), trained one DDIM step at a time to
reconstruct the inversion's latents with an attention regulariser (§3.2, eq. 5-6)."""
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ddim import abar_before, ddim_invert, ddim_prev, guided, inversion_timesteps

PROMPT_TOKENS = 77
IMAGE_TOKENS = 197  # OpenAI CLIP ViT-B/16 at 224²: the class token and 14 × 14 patches

# attend(z, t, context, film, record) -> (ε, the cond cross-attention maps of the attention-loss layers, or [])
Attend = Callable[[torch.Tensor, int, torch.Tensor, Optional[tuple], bool], tuple[torch.Tensor, list]]


class MappingNet(nn.Module):
    """M_t of §3.1: 1×1 convolutions over the 197 image tokens to 2·77 rows (γ then β), one conv block with a
    per-row normalisation and LeakyReLU. The official names, so official checkpoints import by renaming; its
    BatchNorm always runs in training mode at batch 1, which is this InstanceNorm (no running statistics)."""

    def __init__(self, image_tokens: int = IMAGE_TOKENS, tokens: int = PROMPT_TOKENS):
        super().__init__()
        rows = 2 * tokens
        self.conv_start = nn.Conv1d(image_tokens, rows, 1)
        self.conv_block = nn.Sequential(nn.Sequential(nn.Conv1d(rows, rows, 1), nn.InstanceNorm1d(rows, affine=True),
                                                      nn.LeakyReLU(0.01)))
        self.conv_end = nn.Conv1d(rows, rows, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.conv_end(self.conv_block(self.conv_start(features)))
        return out.chunk(2, dim=1)


def init_mapping(seed: int, image_tokens: int = IMAGE_TOKENS) -> MappingNet:
    """M₀ with torch's default initialisation, seeded (the reference leaves it unseeded; M_i>0 start from M_(i−1))."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MappingNet(image_tokens)


def film(context: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The mapped value input c̃ = c⊙γ + β (§3.1, the official FiLM form)."""
    return context * gamma + beta


def inner_steps(i: int, first: int = 100) -> int:
    """N_i = ⌈first·e^(−0.1 i)⌉ optimisation iterations at step i (100, 91, 82, … 6: 1015 in all for T = 30)."""
    return math.ceil(first * math.exp(-0.1 * i))


def mapping_lr(i: int) -> float:
    """Adam's learning rate at step i: 1e-2·(1 − i/100)."""
    return 1e-2 * (1 - i / 100)


def stop_threshold(i: int, early_stop: float = 1e-5) -> float:
    """The reference's early stop at step i: the loss is below early_stop + 2e-5·i."""
    return early_stop + i * 2e-5


def attention_loss(maps: list, targets: list) -> torch.Tensor:
    """L_att of eq. 6: the sum over the regularised layers of the mean squared error to the inversion's maps."""
    return sum((F.mse_loss(m.float(), a.float()) for m, a in zip(maps, targets)), torch.zeros(()))


def invert_with_maps(attend: Attend, z0: torch.Tensor, context: torch.Tensor, abar: torch.Tensor, steps: int,
                     callback=None) -> tuple[list, list]:
    """DDIM inversion (§3.2) that also records the cond cross-attention maps of each step: T + 1 latents, and T + 1
    map sets with the last repeated (the reference's targets: step i of training reads entry T − i)."""
    maps = []

    def eps_fn(z, t, c):
        eps, recorded = attend(z, t, c, None, True)
        maps.append([m.detach() for m in recorded])
        return eps

    latents = ddim_invert(eps_fn, z0, context, abar, steps, callback)
    return latents, maps + maps[-1:]


@dataclass
class StyleDiffusionRun:
    """What training returns: one state dict per step (official names), the losses per iteration as (L_rec, L_att),
    and the latent the mapped CFG denoising ends at (the reconstruction)."""
    mappings: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    reconstruction: Optional[torch.Tensor] = None


def train_step(attend: Attend, z: torch.Tensor, t: int, abar_t, abar_prev, target: torch.Tensor, target_maps: list,
               context: torch.Tensor, uncond: torch.Tensor, features: torch.Tensor, mapping: MappingNet, i: int,
               guidance: float = 7.5, iterations: int = 100, use_attention_loss: bool = True, early_stop: bool = True,
               callback: Optional[Callable[[int, int, float], None]] = None) -> tuple[torch.Tensor, list]:
    """§3.2 at step i: M_i takes up to `iterations` Adam steps (lr_i) on ‖DDIM(z̄, ε_∅ + w(ε_c(c̃) − ε_∅)) −
    z_(T−i−1)‖² + L_att, ε_∅ (raw values) computed once; then z̄ moves on with the trained M_i. Returns the next z̄
    and (i, L_rec, L_att) per iteration."""
    with torch.no_grad():
        eps_u, _ = attend(z, t, uncond, None, False)
    opt, losses = torch.optim.Adam(mapping.parameters(), lr=mapping_lr(i)), []
    for j in range(iterations):
        eps_c, recorded = attend(z, t, context, mapping(features), use_attention_loss)
        rec = F.mse_loss(ddim_prev(guided(eps_u, eps_c, guidance), z, abar_t, abar_prev).float(), target.float())
        att = attention_loss(recorded, target_maps) if use_attention_loss else torch.zeros(())
        loss = rec + att
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append((i, rec.item(), att.item()))
        if callback is not None:
            callback(i, j, loss.item())
        if early_stop and loss.item() < stop_threshold(i):
            break
    with torch.no_grad():
        eps_c, _ = attend(z, t, context, mapping(features), False)
        return ddim_prev(guided(eps_u, eps_c, guidance), z, abar_t, abar_prev), losses


def train_mappings(attend: Attend, latents: list, maps: list, context: torch.Tensor, uncond: torch.Tensor,
                   features: torch.Tensor, abar: torch.Tensor, mapping: MappingNet, guidance: float = 7.5,
                   first_steps: int = 100, use_attention_loss: bool = True, early_stop: bool = True,
                   callback: Optional[Callable[[int, int, float], None]] = None) -> StyleDiffusionRun:
    """§3.2 over the inversion's latents z₀ … z_T and maps: step i (t descending) trains M_i, warm-started from
    M_(i−1), for N_i iterations (train_step). E(x) is computed once by the caller."""
    steps = len(latents) - 1
    stride = len(abar) // steps
    run, z = StyleDiffusionRun(), latents[-1]
    for i, t in enumerate(inversion_timesteps(steps, len(abar))[::-1]):
        z, losses = train_step(attend, z, t, abar[t], abar_before(abar, t, stride), latents[steps - i - 1],
                               maps[steps - i], context, uncond, features, mapping, i, guidance,
                               inner_steps(i, first_steps), use_attention_loss, early_stop, callback)
        run.losses += losses
        run.mappings.append({k: v.detach().clone() for k, v in mapping.state_dict().items()})
    run.reconstruction = z
    return run
