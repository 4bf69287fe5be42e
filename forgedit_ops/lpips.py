"""LPIPS v0.1 with the AlexNet trunk (Zhang et al. 2018) and StyleDiffusion's NS-LPIPS (Li et al. 2023, §4: LPIPS of
the non-edited region), re-implemented in plain torch from the formula (design note §5.2). The weights are state
dicts: torchvision AlexNet's `features.{0,3,6,8,10}.{weight,bias}` and lpips's `lin{0..4}.model.1.weight`."""
import torch
import torch.nn.functional as F

CONVS = (0, 3, 6, 8, 10)  # the convolutions of torchvision AlexNet's `features`; relu1 and relu2 are followed by pools
SHIFT = (-0.030, -0.088, -0.188)  # LPIPS's ScalingLayer
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
SIZE = 256  # ns_lpips.py: transforms.Resize((256, 256)) of every image and mask
GRAY = 0.2989 + 0.587 + 0.114  # torchvision's Grayscale of the 3-channel mask PNG: 0.9999 of its value
MODES = ("paper", "corrected")


def alexnet_features(x: torch.Tensor, trunk: dict) -> list[torch.Tensor]:
    """LPIPS's five taps relu1..relu5 of torchvision AlexNet `features` (conv1 11x11 stride 4 pad 2; 3x3 stride-2 max
    pools after relu1 and relu2; the other convolutions keep the size)."""
    taps = []
    for i, k in enumerate(CONVS):
        if i in (1, 2):
            x = F.max_pool2d(x, 3, 2)
        weight = trunk[f"features.{k}.weight"]
        stride, padding = (4, 2) if k == 0 else (1, weight.shape[-1] // 2)
        x = F.relu(F.conv2d(x, weight, trunk[f"features.{k}.bias"], stride=stride, padding=padding))
        taps.append(x)
    return taps


def unit_channels(f: torch.Tensor) -> torch.Tensor:
    """LPIPS's normalize_tensor: each position's channel vector divided by its L2 norm + 1e-10."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + EPS)


def lpips(x: torch.Tensor, y: torch.Tensor, trunk: dict, lin: dict, normalize: bool = False) -> torch.Tensor:
    """LPIPS v0.1 (Zhang et al. 2018, eq. 1) per image, (B,): images (B, 3, H, W) in [-1, 1] ([0, 1] with normalize),
    shifted and scaled, tapped, unit-normalised, squared difference weighted by lin (1x1, no bias), spatial mean, sum."""
    if normalize:
        x, y = 2 * x - 1, 2 * y - 1
    shift, scale = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) for v in (SHIFT, SCALE))
    taps = alexnet_features((torch.cat([x, y]) - shift) / scale, trunk)
    total = 0
    for k, f in enumerate(taps):
        a, b = unit_channels(f).chunk(2)
        total = total + F.conv2d((a - b) ** 2, lin[f"lin{k}.model.1.weight"]).mean((2, 3))
    return total[:, 0]


def resized(x: torch.Tensor, quantise: bool) -> torch.Tensor:
    """ns_lpips.py's Resize((256, 256)) of an image file: PIL's antialiased bilinear (a copy at 256²), then 8-bit
    when `quantise` (ToTensor of the resized 8-bit image)."""
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    return (x * 255).round() / 255 if quantise else x


def ns_lpips(source: torch.Tensor, edited: torch.Tensor, background: torch.Tensor, trunk: dict, lin: dict,
             mode: str = "paper") -> torch.Tensor:
    """NS-LPIPS per image (B,) as StyleDiffusion's eval_metrics/ns_lpips.py: images (B, 3, H, W) in [0, 1] and the
    soft background mask (B or 1, H, W; 1 = keep) at 256², the mask multiplied into both. paper: 8-bit files, the
    mask through Grayscale, [0, 1] fed to LPIPS as if [-1, 1] (no normalize); corrected: float, [-1, 1] inputs."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    paper = mode == "paper"
    mask = resized(background.unsqueeze(1).to(source), paper) * (GRAY if paper else 1)
    src, edit = resized(source, paper) * mask, resized(edited, paper) * mask
    return lpips(src, edit, trunk, lin, normalize=not paper)
