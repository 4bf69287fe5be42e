"""The fine-tuned result passed between nodes, and the base-model fingerprint that ties it to its weights."""
import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Iterable

import torch


@dataclass
class ForgeditResult:
    """What one per-image fine-tune learned (Forgedit §3): Δ of the trained UNet tensors (fp32, CPU, diffusion-model
    keys), the optimised source embedding e_s (1, 77, C), the empty-prompt embedding used as the CFG negative,
    metadata (method, base fingerprint, the training settings, losses), and for DreamBooth-Forgedit (§7) Δ of the
    text encoder (CLIP patcher keys). `accept_any_base` (a Forgedit Load choice) and `token` (the identity Forgedit
    Forget marks its MODEL with) belong to this session and are never saved."""
    deltas: dict[str, torch.Tensor]
    source_embedding: torch.Tensor
    uncond_embedding: torch.Tensor
    metadata: dict = field(default_factory=dict)
    text_deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    accept_any_base: bool = False
    token: str = field(default_factory=lambda: uuid.uuid4().hex, init=False, compare=False, repr=False)

    def _comfy_cache_tensors(self) -> list[torch.Tensor]:
        """Every tensor held, so ComfyUI's RAM-pressure cache sizes this result by what it really holds (1-3.5 GB)."""
        return [*self.deltas.values(), *self.text_deltas.values(), self.source_embedding, self.uncond_embedding]


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
