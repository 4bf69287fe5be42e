"""Forgetting: which learned UNet tensors are reset to the base model, and by how much (Forgedit §5).

Keys are ComfyUI/LDM SD1.x names relative to the diffusion model (`input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight`).
Encoder = input_blocks.4-11 (diffusers down_blocks.1-3), decoder = output_blocks.3-11 (up_blocks.1-3).
"""
import re
from typing import Callable

import torch

_TRAINED = re.compile(r"^(input_blocks\.([4-9]|1[01])|output_blocks\.([3-9]|1[01]))\.")
_ENCODER1 = re.compile(r"^input_blocks\.[456]\.")
_DECODER2 = re.compile(r"^output_blocks\.[678]\.")
_CROSS_KV = re.compile(r"\.attn2\.to_[kv]\.")


def is_trained(key: str) -> bool:
    """Forgedit §3: the jointly fine-tuned set, diffusers down_blocks.1-3 + up_blocks.1-3 (518 of 686 SD1.x tensors)."""
    return _TRAINED.match(key) is not None


def whole_unet(key: str) -> bool:
    """Imagic §3.1 and Forgedit §7: every UNet tensor is trained (686 in SD1.x)."""
    return True


TRAINED_BLOCKS = [f"input_blocks.{i}" for i in range(4, 12)] + [f"output_blocks.{i}" for i in range(3, 12)]


def missing_blocks(keys) -> list[str]:
    """The blocks of Forgedit's trained set (§3) that a UNet with these parameter keys lacks."""
    present = {".".join(k.split(".")[:2]) for k in keys}
    return [b for b in TRAINED_BLOCKS if b not in present]


def _encoder(key: str) -> bool:
    return is_trained(key) and key.startswith("input_blocks.")


def _decoder(key: str) -> bool:
    return is_trained(key) and key.startswith("output_blocks.")


def _attn(key: str) -> bool:
    return ".attn1." in key or ".attn2." in key


STRATEGIES: dict[str, Callable[[str], bool]] = {
    "donotforget": lambda k: False,
    "encoderkv": lambda k: _encoder(k) and not _CROSS_KV.search(k),
    "noencoder": _encoder,
    "encoderattn": lambda k: _encoder(k) and not _attn(k),
    "encoderattn+encoder1": lambda k: _encoder(k) and not _attn(k) and not _ENCODER1.match(k),
    "decoderkv": lambda k: _decoder(k) and not _CROSS_KV.search(k),
    "decoderattn": lambda k: _decoder(k) and not _attn(k),
    "decoderattn+decoder2": lambda k: _decoder(k) and not _attn(k) and not _DECODER2.match(k),
}

# Forgedit §7: DreamBooth+Forgedit trains everything, so its rules act on every key of diffusers down_blocks.0-3
# (input_blocks.1-11; conv_in = input_blocks.0 is not in down_blocks) and up_blocks.0-3 (output_blocks.0-11).
_DOWN = re.compile(r"^input_blocks\.([1-9]|1[01])\.")
_UP = re.compile(r"^output_blocks\.")
DREAMBOOTH_STRATEGIES: dict[str, Callable[[str], bool]] = {
    "dreambooth: noencoder": lambda k: _DOWN.match(k) is not None,
    "dreambooth: nodecoder": lambda k: _UP.match(k) is not None,
    "dreambooth: encoderattn": lambda k: _DOWN.match(k) is not None and not _attn(k),
    "dreambooth: encoderattn+encoder1": lambda k: _DOWN.match(k) is not None and not _attn(k) and not _ENCODER1.match(k),
    "dreambooth: decoderattn": lambda k: _UP.match(k) is not None and not _attn(k),
    "dreambooth: encoderkv only": lambda k: _DOWN.match(k) is not None and _CROSS_KV.search(k) is not None,
}
CUSTOM = "custom (regex)"


def forget_rule(strategy: str, pattern: str = "") -> Callable[[str], bool]:
    """The §5 rule selecting the forgotten keys; `custom (regex)` forgets every key the pattern searches."""
    if strategy == CUSTOM:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"forget_pattern is not a valid regular expression: {e}") from None
        if not pattern:
            raise ValueError("forget_pattern is empty: give a regular expression over UNet keys, e.g. 'input_blocks\\.[78]\\.'")
        return lambda k: regex.search(k) is not None
    rules = {**STRATEGIES, **DREAMBOOTH_STRATEGIES}
    if strategy not in rules:
        raise ValueError(f"unknown forgetting strategy {strategy!r}; choose one of {', '.join(rules)} or {CUSTOM}")
    return rules[strategy]


def forgetting_patches(deltas: dict[str, torch.Tensor], rule: Callable[[str], bool], degree: float) -> list[tuple[dict, float]]:
    """Forgedit §5/§8 merge as weight patches: kept tensors get p_orig + Δ, forgotten ones p_orig + c·Δ, i.e.
    p = c·p_learned + (1 − c)·p_orig. Returns (deltas, strength) groups, one per distinct non-zero strength."""
    groups: dict[float, dict] = {}
    for key, delta in deltas.items():
        groups.setdefault(float(degree) if rule(key) else 1.0, {})[key] = delta
    return [(group, strength) for strength, group in groups.items() if strength != 0.0]
