"""The optimiser and the precision policy on plain tensors: fp16 overflow skips a step, reduced precision really runs,
fused steps leave no hooks behind, and `auto` follows the memory estimate (no ComfyUI)."""
import pytest
import torch
from forgedit_ops.finetune import FinetuneConfig, denoising_loop
from forgedit_ops.optim import Adam, LossScale
from forgedit_ops.precision import RunSize, choose_options, preset_options, training_bytes

ABAR = torch.linspace(0.999, 0.01, 1000)


class Toy(torch.nn.Module):
    """ε(x, t, c) = conv(x) + mean(c): enough to train, and to see which dtype autocast computed in."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.dtypes, self.blow_up_at, self.calls = [], None, 0

    def forward(self, x, t, c):
        out = self.conv(x)
        self.dtypes.append(out.dtype)
        self.calls += 1
        if self.calls == self.blow_up_at:
            out = out * torch.tensor(6e4, dtype=out.dtype)  # its gradient overflows fp16 under the loss scale
        return out + c.mean()


def train(toy, precision, steps=4):
    cfg = FinetuneConfig(samples=2 * steps, batch_size=2, unet_lr=1e-2, precision=precision)
    groups = [{"params": list(toy.parameters()), "lr": cfg.unet_lr}]
    z0, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 8)
    return denoising_loop(toy, groups, lambda: c, z0, ABAR, cfg, steps, torch.Generator().manual_seed(0))


def test_fp16_overflow_skips_the_step_and_writes_no_nan():
    clean, blown = Toy(), Toy()
    blown.blow_up_at = 2
    clean_losses, blown_losses = train(clean, "fp16"), train(blown, "fp16")
    assert len(clean_losses) == 4 and len(blown_losses) == 3
    assert all(torch.isfinite(p).all() for p in blown.parameters())
    assert not torch.equal(blown.conv.weight, Toy().conv.weight)
    assert set(clean.dtypes) == {torch.float16}


def test_loss_scale_halves_on_overflow_and_grows_after_clean_steps():
    p = torch.nn.Parameter(torch.ones(3))
    scale = LossScale(scale=8.0, interval=2)
    opt = Adam([{"params": [p], "lr": 0.1}], loss_scale=scale)
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not opt.step() and scale.scale == 4.0 and p.grad is None and torch.equal(p, torch.ones(3))
    for _ in range(2):
        p.grad = torch.full((3,), 4.0)
        assert opt.step()
    assert scale.scale == 8.0 and not torch.equal(p, torch.ones(3))


def test_bf16_autocast_really_runs_and_exact_stays_fp32():
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        toy = Toy()
        train(toy, precision, steps=1)
        assert set(toy.dtypes) == {dtype}


def test_fused_steps_remove_their_hooks():
    p = torch.nn.Parameter(torch.ones(3))
    with Adam([{"params": [p], "lr": 0.1}], moments="8-bit", fused=True):
        p.sum().backward()
        assert not torch.equal(p, torch.ones(3)) and p.grad is None
    stepped = p.detach().clone()
    p.sum().backward()
    assert torch.equal(p, stepped) and p.grad is not None
    with pytest.raises(ValueError, match="cannot be fused"):
        Adam([{"params": [p], "lr": 0.1}], fused=True, loss_scale=LossScale())


SD15 = RunSize(trained=587_642_600, frozen=272_000_000, batch=10, latent_pixels=64 * 64, channels=320)


def test_memory_estimate_orders_the_presets_and_drives_auto():
    exact, fast, low = (training_bytes(SD15, preset_options(p, "bf16")) for p in ("exact", "fast", "low memory"))
    assert low < fast < exact and 15e9 < exact < 25e9  # the reference's fp32 recipe: about 20 GB
    assert choose_options("auto", "bf16", SD15, free_bytes=fast) == preset_options("fast", "bf16")
    assert choose_options("auto", "bf16", SD15, free_bytes=fast - 1) == preset_options("low memory", "bf16")
    assert preset_options("low memory", "fp16")["fused_step"] is False
    with pytest.raises(ValueError, match="unknown precision 'fastest'"):
        preset_options("fastest", "bf16")
