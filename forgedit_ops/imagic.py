"""Imagic's sequential optimisation recipes (Imagic §3.1, SD form) and Forgedit transferred to Imagic (Forgedit §8)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """Stage 1: `text_steps` Adam steps at `text_lr` on the embedding; stage 2: `unet_steps` at `unet_lr` on the UNet
    tensors `method` trains (imagic: all of them from the target prompt; forgedit-imagic: Forgedit's set from the source)."""
    method: str
    text_steps: int
    text_lr: float
    unet_steps: int
    unet_lr: float


RECIPES = {
    "imagic (paper)": Recipe("imagic", 1000, 2e-3, 1500, 5e-7),
    "imagic (diffusers)": Recipe("imagic", 500, 1e-3, 1000, 2e-6),
    "forgedit-imagic": Recipe("forgedit-imagic", 400, 1e-3, 1000, 2e-6),
}
