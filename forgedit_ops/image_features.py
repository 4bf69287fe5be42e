"""E(x)'s input in StyleDiffusion (Li et al. 2023, §3.1): the reference's OpenAI CLIP ViT-B/16 preprocessing, which
torchvision 0.13 runs on a tensor as plain bicubic (no antialias), without clamping or 8-bit rounding."""
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_B16 = dict(layers=12, width=768, patch=16, positions=197, image_size=224)


def reference_clip_preprocess(image: torch.Tensor) -> torch.Tensor:
    """StyleDiffusion §3.1 Resize(224), CenterCrop(224), Normalize: (B, H, W, 3) in [0, 1] → (B, 3, 224, 224)."""
    size = VIT_B16["image_size"]
    x = image[..., :3].movedim(-1, 1).float()
    h, w = x.shape[-2:]
    long = int(size * max(h, w) / min(h, w))
    resized = (size, long) if h <= w else (long, size)
    x = F.interpolate(x, size=resized, mode="bicubic", align_corners=False, antialias=False)
    top, left = (int(round((n - size) / 2.0)) for n in resized)
    x = x[:, :, top:top + size, left:left + size]
    mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std
