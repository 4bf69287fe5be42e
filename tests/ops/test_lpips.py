"""LPIPS and NS-LPIPS on plain tensors (no ComfyUI, no lpips package): the functional AlexNet trunk against torch's
layers laid out as torchvision's `features` and sliced as LPIPS taps them, the distance against its formula written
out, and NS-LPIPS's modes, 256² resizing and soft background mask (StyleDiffusion's eval_metrics/ns_lpips.py)."""
import pytest
import torch
import torch.nn.functional as F
from forgedit_ops.lpips import GRAY, alexnet_features, lpips, ns_lpips
from torch import nn

CHANNELS = (16, 24, 32, 24, 24)  # AlexNet's kernels, strides and pools at a quarter of its widths (64, 192, 384, 256, 256)


def alexnet_layers(c: tuple = CHANNELS) -> nn.Sequential:
    """torchvision's AlexNet `features`, layer for layer, with the given widths."""
    return nn.Sequential(nn.Conv2d(3, c[0], 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(c[0], c[1], 5, padding=2),
                         nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(),
                         nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(), nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(3, 2))


@pytest.fixture(scope="module")
def weights():
    """A random trunk (torch's default init, the classifier-free `features.*` keys) and positive random lins."""
    torch.manual_seed(0)
    layers = alexnet_layers()
    trunk = {f"features.{k}": v for k, v in layers.state_dict().items()}
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(CHANNELS)}
    return layers, trunk, lin


def images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def direct_lpips(layers, lin, x, y) -> torch.Tensor:
    """LPIPS written out: each image scaled, run through the layers, tapped after slices [0:2], [2:5], [5:8], [8:10],
    [10:12]; Σ_l mean_hw(w_l · (x̂_l − ŷ_l)²) with x̂ = x / (‖x‖ + 1e-10) over channels."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(v):
        h, out = (v - shift) / scale, []
        for a, b in ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12)):
            h = layers[a:b](h)
            out.append(h / (torch.sqrt((h ** 2).sum(1, keepdim=True)) + 1e-10))
        return out

    return sum(((a - b) ** 2 * lin[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)).sum(1).mean((1, 2))
               for k, (a, b) in enumerate(zip(taps(x), taps(y))))


def test_the_taps_are_alexnets_relu_outputs(weights):
    layers, trunk, _ = weights
    x = images(2, 67, 1)
    ours, h = alexnet_features(x, trunk), x
    for tap, (a, b) in zip(ours, ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))):
        h = layers[a:b](h)
        assert tap.shape == h.shape and torch.allclose(tap, h, rtol=1e-5, atol=1e-6)
    assert [t.shape[1] for t in ours] == list(CHANNELS)


def test_lpips_matches_the_formula(weights):
    layers, trunk, lin = weights
    x, y = images(3, 64, 2) * 2 - 1, images(3, 64, 3) * 2 - 1
    ours, direct = lpips(x, y, trunk, lin), direct_lpips(layers, lin, x, y)
    assert ours.shape == (3,) and (ours - direct).abs().max() <= 1e-5 * direct.abs().max()
    assert torch.equal(lpips(x, x, trunk, lin), torch.zeros(3))
    assert torch.allclose(lpips((x + 1) / 2, (y + 1) / 2, trunk, lin, normalize=True), ours, rtol=1e-5)


def masked_direct(layers, lin, src, edit, mask, paper: bool) -> torch.Tensor:
    """ns_lpips.py's pipeline at 256² given as such: mask · image into LPIPS, [0, 1] read as [-1, 1] in paper mode."""
    src, edit, mask = src * mask, edit * mask, mask
    return direct_lpips(layers, lin, src, edit) if paper else direct_lpips(layers, lin, 2 * src - 1, 2 * edit - 1)


def quantised(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round() / 255


@pytest.mark.parametrize("mode", ["paper", "corrected"])
def test_ns_lpips_at_256_is_masked_lpips_in_either_range(weights, mode):
    layers, trunk, lin = weights
    src, edit = quantised(images(2, 256, 4)), quantised(images(2, 256, 5))
    mask = quantised(torch.rand(1, 256, 256, generator=torch.Generator().manual_seed(6)))
    ours = ns_lpips(src, edit, mask, trunk, lin, mode)
    paper = mode == "paper"
    expected = masked_direct(layers, lin, src, edit, mask.unsqueeze(1) * (GRAY if paper else 1), paper)
    assert ours.shape == (2,) and (ours - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_the_modes_differ_and_an_unknown_mode_is_refused(weights):
    _, trunk, lin = weights
    src, edit, mask = images(1, 256, 7), images(1, 256, 8), torch.ones(1, 256, 256)
    assert not torch.allclose(ns_lpips(src, edit, mask, trunk, lin, "paper"),
                              ns_lpips(src, edit, mask, trunk, lin, "corrected"), rtol=1e-3)
    with pytest.raises(ValueError, match="not one of paper, corrected"):
        ns_lpips(src, edit, mask, trunk, lin, "binary")


@pytest.mark.parametrize("mode", ["paper", "corrected"])
def test_only_the_background_counts(weights, mode):
    """An edit confined to where the mask is 0 scores exactly 0; the same edit where it is 1 does not."""
    _, trunk, lin = weights
    src = images(1, 256, 9)
    edit, fg = src.clone(), torch.zeros(1, 256, 256)
    fg[:, 64:192, 64:192] = 1
    edit[:, :, 64:192, 64:192] = images(1, 128, 10)
    assert ns_lpips(src, edit, 1 - fg, trunk, lin, mode).item() == 0
    assert ns_lpips(src, edit, fg, trunk, lin, mode).item() > 0


def test_the_mask_is_soft(weights):
    """ns_lpips.py overwrites its 0.5 threshold: a mask of 0.4 and 0.6 is not the binary mask."""
    _, trunk, lin = weights
    src, edit = images(1, 256, 11), images(1, 256, 12)
    soft = torch.full((1, 256, 256), 0.4)
    soft[:, :, 128:] = 0.6
    binary = (soft > 0.5).float()
    assert not torch.allclose(ns_lpips(src, edit, soft, trunk, lin), ns_lpips(src, edit, binary, trunk, lin))


def test_other_sizes_are_resized_to_256_and_the_mask_broadcasts(weights):
    """A 512² pair scores as its antialiased bilinear 256² resize (PIL's Resize of the files); a (1, H, W) mask serves
    the whole batch; corrected mode does not quantise."""
    _, trunk, lin = weights
    src, edit, mask = images(2, 512, 13), images(2, 512, 14), torch.rand(1, 384, 384)
    down = lambda x: F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False, antialias=True)
    small_mask = down(mask.unsqueeze(1))[:, 0]
    assert torch.allclose(ns_lpips(src, edit, mask, trunk, lin, "corrected"),
                          ns_lpips(down(src), down(edit), small_mask, trunk, lin, "corrected"), rtol=1e-5)
    assert torch.allclose(ns_lpips(src, edit, mask, trunk, lin, "paper"),
                          ns_lpips(quantised(down(src)), quantised(down(edit)), quantised(small_mask), trunk, lin, "paper"),
                          rtol=1e-5)
    per_image = ns_lpips(src, edit, mask.expand(2, -1, -1), trunk, lin, "paper")
    assert torch.allclose(ns_lpips(src, edit, mask, trunk, lin, "paper"), per_image)
