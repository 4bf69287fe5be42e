"""Image preprocessing and the labelled sweep grid."""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


def stretch_resize(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Forgedit §2 preprocessing: resize (B, H, W, C) in [0, 1] to width×height, aspect not kept, antialiased bicubic
    like PIL's default resize."""
    x = F.interpolate(image.movedim(-1, 1).float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1).movedim(1, -1)


def center_crop_resize(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The inversion references' preprocessing (P2P's load_512): the centred crop of the image's largest
    width:height region, then the stretch resize (a square crop at 512², as the reference)."""
    h, w = image.shape[1:3]
    crop_w, crop_h = min(w, round(h * width / height)), min(h, round(w * height / width))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return stretch_resize(image[:, top:top + crop_h, left:left + crop_w], width, height)


def labelled_grid(images: torch.Tensor, rows: int, cols: int, row_labels: list[str], col_labels: list[str]) -> torch.Tensor:
    """Tile (rows·cols, H, W, 3) images row-major into one (1, H', W', 3) image, column labels on top, row labels left."""
    n, h, w, _ = images.shape
    font = ImageFont.load_default(size=max(10, min(h, w) // 16))
    pad_top = font.size * 2 + 8 if any(col_labels) else 0
    pad_left = max((int(font.getlength(s)) for s in row_labels), default=0) + 12 if any(row_labels) else 0
    canvas = Image.new("RGB", (pad_left + cols * w, pad_top + rows * h), "white")
    draw = ImageDraw.Draw(canvas)
    tiles = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        canvas.paste(Image.fromarray(tiles[i]), (pad_left + c * w, pad_top + r * h))
    for c, text in enumerate(col_labels):
        draw.multiline_text((pad_left + c * w + 4, 4), text, fill="black", font=font)
    for r, text in enumerate(row_labels):
        draw.text((4, pad_top + r * h + h // 2), text, fill="black", font=font, anchor="lm")
    return torch.from_numpy(np.array(canvas)).float().div(255).unsqueeze(0)
