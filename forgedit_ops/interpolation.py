"""Text-embedding interpolation: vector subtraction and vector projection (Forgedit §4)."""
import math
import re

import torch


def vector_subtraction(e_src: torch.Tensor, e_tgt: torch.Tensor, gammas: list[float]) -> torch.Tensor:
    """Forgedit eq. vs: e = e_s + γ(e_t − e_s), one row per γ; e_src, e_tgt (1, T, C) -> (len(gammas), T, C)."""
    g = torch.tensor(gammas, dtype=e_src.dtype, device=e_src.device).view(-1, 1, 1)
    return e_src + g * (e_tgt - e_src)


def vector_projection(e_src: torch.Tensor, e_tgt: torch.Tensor, alphas: list[float], betas: list[float]) -> torch.Tensor:
    """Forgedit eq. vp: per token, e = β·(e_t − ⟨e_t, û_s⟩û_s) + α·e_s, one row per (α, β) pair (zipped)."""
    u = torch.nn.functional.normalize(e_src, dim=-1, eps=1e-12)
    e_edit = e_tgt - (e_tgt * u).sum(-1, keepdim=True) * u
    a = torch.tensor(alphas, dtype=e_src.dtype, device=e_src.device).view(-1, 1, 1)
    b = torch.tensor(betas, dtype=e_src.dtype, device=e_src.device).view(-1, 1, 1)
    return b * e_edit + a * e_src


_RANGE = re.compile(r"^(-?[\d.]+):(-?[\d.]+):(-?[\d.]+)$")


def parse_values(text: str, name: str, limit: int = 256) -> list[float]:
    """Parse '0.5, 0.6, 0.7' or an inclusive range 'start:stop:step' ('0.5:0.7:0.1') into a list of floats."""
    values = []
    for part in re.split(r"[,;\s]+", re.sub(r"\s*:\s*", ":", text.strip())) if text.strip() else []:
        match = _RANGE.match(part)
        try:
            if match:
                start, stop, step = (float(x) for x in match.groups())
                if step <= 0 or stop < start:
                    raise ValueError
                count = math.floor((stop - start) / step + 1e-6) + 1
                values += [round(start + i * step, 10) for i in range(count)]
            else:
                values.append(float(part))
        except ValueError:
            raise ValueError(f"{name}: cannot read {part!r}; write numbers like '0.5, 0.6, 0.7' "
                             "or a range 'start:stop:step' such as '0.5:0.7:0.1'") from None
    if not values:
        raise ValueError(f"{name} is empty: give at least one number, e.g. '0.6' or '0.5, 0.6, 0.7'")
    if len(values) > limit:
        raise ValueError(f"{name} has {len(values)} values; at most {limit} are allowed")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must contain finite numbers")
    return values


def interpolate(e_src: torch.Tensor, e_tgt: torch.Tensor, mode: str, gammas: list[float], alphas: list[float]) -> torch.Tensor:
    """§4 dispatch, one row per (α, γ) pair: 'vs' uses γ; 'vp' uses α for identity and γ as β, the editing strength."""
    if mode == "vs":
        return vector_subtraction(e_src, e_tgt, gammas)
    if mode == "vp":
        return vector_projection(e_src, e_tgt, alphas, gammas)
    raise ValueError(f"interpolation mode must be 'vs' or 'vp', got {mode!r}")
