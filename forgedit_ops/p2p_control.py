"""Prompt-to-Prompt's attention edits (Hertz et al. 2022, §3.2) and P2Plus's unconditional self-attention injection
(StyleDiffusion, Li et al. 2023, §3.3) as pure tensor functions, and the per-step state that selects them. Rows of a
UNet call come in chunks (cond or uncond); inside a chunk item 0 is the source, items 1.. the targets."""
from dataclasses import dataclass, field
from typing import Optional

import torch

EDIT_TYPES = ("replace", "refine", "reconstruct")


@dataclass
class CrossEdit:
    """How the targets' cross-attention maps follow the source's (§3.2): word swap (a tokens × tokens mapper), refinement
    (a source index per target token and its α), or none; then the reweighting equalizer (77,) or None."""
    kind: str
    mapper: Optional[torch.Tensor] = None
    alphas: Optional[torch.Tensor] = None
    equalizer: Optional[torch.Tensor] = None


@dataclass
class EditStep:
    """The controller at one DDIM step: the cross edit inside τ_c (None outside), self-attention injection in the cond
    (τ_s) and uncond (τ_u, P2Plus) chunks for maps of at most `self_queries` queries, and the LocalBlend store (a list
    of summed maps of the five 1/32-level layers, or None)."""
    cross: Optional[CrossEdit] = None
    self_cond: bool = False
    self_uncond: bool = False
    self_queries: int = 32 ** 2
    store: Optional[list] = field(default=None, repr=False)


def edited_cross_maps(probs: torch.Tensor, edit: CrossEdit) -> torch.Tensor:
    """The targets' maps of one chunk (items, heads, N, 77) after §3.2's edit: Replace P_src·M, Refine
    P_src[…, m]·α + P_tgt·(1 − α), then ×equalizer; the source row is unchanged."""
    source, targets = probs[:1], probs[1:]
    if edit.kind == "replace":
        new = torch.einsum("bhnw,wv->bhnv", source, edit.mapper.to(probs)).expand_as(targets)
    elif edit.kind == "refine":
        alphas = edit.alphas.to(probs)
        new = source[..., edit.mapper.to(probs.device)] * alphas + targets * (1 - alphas)
    else:
        new = targets
    if edit.equalizer is not None:
        new = new * edit.equalizer.to(probs)
    return torch.cat([source, new])


def injected(x: torch.Tensor, items: int) -> torch.Tensor:
    """Every item of each chunk of `items` rows takes the chunk's source row: with queries and keys injected this way
    the targets' self-attention output is P_src·V_tgt (§3.2's self-attention replacement, exactly, through SDPA)."""
    chunks = x.reshape(-1, items, *x.shape[1:])
    return chunks[:, :1].expand_as(chunks).reshape(x.shape)
