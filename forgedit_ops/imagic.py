"""Imagic's sequential optimisation presets (Imagic §3.1, SD form) and Forgedit transferred to Imagic (Forgedit §8)."""
from dataclasses import dataclass
from typing import Callable

from .forgetting import is_trained


@dataclass(frozen=True)
class SequentialPreset:
    """Stage 1: `text_steps` Adam steps at `text_lr` on the embedding initialised from the `init` prompt; stage 2:
    `unet_steps` at `unet_lr` on the UNet tensors `trains` selects."""
    method: str
    init: str
    text_steps: int
    text_lr: float
    unet_steps: int
    unet_lr: float
    trains: Callable[[str], bool]


def whole_unet(key: str) -> bool:
    """Imagic §3.1: stage 2 fine-tunes every UNet tensor (686 in SD1.x)."""
    return True


SEQUENTIAL_PRESETS = {
    "imagic (paper)": SequentialPreset("imagic", "target", 1000, 2e-3, 1500, 5e-7, whole_unet),
    "imagic (diffusers)": SequentialPreset("imagic", "target", 500, 1e-3, 1000, 2e-6, whole_unet),
    "forgedit-imagic": SequentialPreset("forgedit-imagic", "source", 400, 1e-3, 1000, 2e-6, is_trained),
}
