"""Text-embedding interpolation: vector subtraction and vector projection, and the γ / α / seed lists the nodes sweep
(Forgedit §4)."""
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


GAMMA_EXAMPLE = ("0.5, 0.6, 0.7", "0.5:0.7:0.1")
ALPHA_EXAMPLE = ("0.7, 0.9", "0.7:0.9:0.1")
SEED_EXAMPLE = ("0, 1, 2, 3", "0:3:1")
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed range


def _hint(example: tuple[str, str]) -> str:
    return f"write e.g. '{example[0]}' or a range 'start:stop:step' such as '{example[1]}'"


def _items(text: str, name: str, example: tuple[str, str]) -> list[str]:
    """The items of a list input, split at commas, semicolons and spaces; 'start : stop : step' is one item."""
    if not text.strip():
        raise ValueError(f"{name} is empty: {_hint(example)}")
    items = []
    for i, chunk in enumerate(re.split(r"[,;]", text), 1):
        words = re.sub(r"\s*:\s*", ":", chunk.strip()).split()
        if not words:
            raise ValueError(f"{name}: item {i} of {text!r} is empty (two commas in a row, or a comma at an end); "
                             f"{_hint(example)}")
        items += words
    return items


def _require_size(name: str, count: int, limit: int) -> None:
    if count > limit:
        raise ValueError(f"{name} has {count} values; at most {limit} are allowed")


def parse_values(text: str, name: str, example: tuple[str, str] = GAMMA_EXAMPLE, limit: int = 256) -> list[float]:
    """Parse '0.5, 0.6, 0.7' or an inclusive range 'start:stop:step' ('0.5:0.7:0.1') into a list of floats."""
    runs = []
    for item in _items(text, name, example):
        try:
            numbers = [float(x) for x in item.split(":")]
        except ValueError:
            raise ValueError(f"{name}: cannot read {item!r}; {_hint(example)}") from None
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"{name} must contain finite numbers, not {item!r}")
        if len(numbers) == 1:
            runs.append((numbers[0], 0.0, 1))
            continue
        if len(numbers) != 3 or numbers[2] <= 0 or numbers[1] < numbers[0]:
            raise ValueError(f"{name}: cannot read the range {item!r}: write start:stop:step with start <= stop and "
                             f"step > 0, e.g. '{example[1]}'")
        start, stop, step = numbers
        runs.append((start, step, math.floor((stop - start) / step + 1e-6) + 1))
    _require_size(name, sum(n for _, _, n in runs), limit)
    return [round(start + i * step, 10) for start, step, n in runs for i in range(n)]


def _seed(part: str, name: str) -> int:
    if re.fullmatch(r"\d+", part) and int(part) <= MAX_SEED:
        return int(part)
    try:
        float(part)
    except ValueError:
        raise ValueError(f"{name}: cannot read {part!r}; {_hint(SEED_EXAMPLE)}") from None
    raise ValueError(f"{name}: {part!r} is not a seed; seeds are whole numbers from 0 to {MAX_SEED}")


def parse_seeds(text: str, name: str = "seeds", limit: int = 256) -> list[int]:
    """Parse '0, 1, 2, 3' or an inclusive range '0:3:1' into whole-number seeds in ComfyUI's range."""
    runs = []
    for item in _items(text, name, SEED_EXAMPLE):
        numbers = [_seed(x, name) for x in item.split(":")]
        if len(numbers) == 1:
            runs.append((numbers[0], 0, 1))
            continue
        if len(numbers) != 3 or numbers[2] == 0 or numbers[1] < numbers[0]:
            raise ValueError(f"{name}: cannot read the range {item!r}: write start:stop:step with start <= stop and "
                             f"step >= 1, e.g. '{SEED_EXAMPLE[1]}'")
        start, stop, step = numbers
        runs.append((start, step, (stop - start) // step + 1))
    _require_size(name, sum(n for _, _, n in runs), limit)
    return [start + i * step for start, step, n in runs for i in range(n)]


def interpolate(e_src: torch.Tensor, e_tgt: torch.Tensor, mode: str, gammas: list[float], alphas: list[float]) -> torch.Tensor:
    """§4 dispatch, one row per (α, γ) pair: 'vs' uses γ; 'vp' uses α for identity and γ as β, the editing strength."""
    if mode == "vs":
        return vector_subtraction(e_src, e_tgt, gammas)
    if mode == "vp":
        return vector_projection(e_src, e_tgt, alphas, gammas)
    raise ValueError(f"interpolation mode must be 'vs' or 'vp', got {mode!r}")
