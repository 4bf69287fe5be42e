"""The source prompt from a BLIP caption, as the reference builds it (Forgedit §2)."""
import torch
from PIL import Image

PHOTO_PREFIX = "A photo of "


def source_prompt(caption: str, target_prompt: str = "") -> str:
    """The reference's only prompt rule: "A photo of " + caption when the target prompt contains the literal,
    case-sensitive "A photo of ", else the caption."""
    return PHOTO_PREFIX + caption if PHOTO_PREFIX in target_prompt else caption


def to_pil(image: torch.Tensor) -> Image.Image:
    """One (H, W, C) image in [0, 1] as the 8-bit RGB picture it was loaded from, at its original size."""
    pixels = (image[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels)
