"""The fine-tuned result passed between nodes, and the base-model fingerprint that ties it to its weights."""
import hashlib
from dataclasses import dataclass, field
from typing import Iterable

import torch


@dataclass
class ForgeditResult:
    """What one per-image fine-tune learned (Forgedit §3): Δ of the trained UNet tensors (fp32, CPU, diffusion-model
    keys), the optimised source embedding e_s (1, 77, C), the empty-prompt embedding used as the CFG negative,
    metadata (base fingerprint, source prompt, resolution, seed, hyper-parameters, losses), and for DreamBooth-Forgedit
    (§7) Δ of the text encoder (CLIP patcher keys)."""
    deltas: dict[str, torch.Tensor]
    source_embedding: torch.Tensor
    uncond_embedding: torch.Tensor
    metadata: dict = field(default_factory=dict)
    text_deltas: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]], samples: int = 64) -> str:
    """Identity of a set of weights: names, shapes and `samples` strided values of every tensor, rounded to fp16 so
    fp32 and fp16 loads of one checkpoint agree, hashed with SHA-256."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        flat = t.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)][:samples]
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(picked.half().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
