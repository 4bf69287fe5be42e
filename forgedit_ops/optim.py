"""The fine-tunes' optimiser: Adam with optional reduced-precision moments, steps fused into backward, and dynamic loss
scaling for fp16 compute."""
import logging

import torch
import torch.nn.functional as F

FP8_MAX, BLOCK = torch.finfo(torch.float8_e4m3fn).max, 256


def quantize_blockwise_(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """Blockwise 8-bit optimiser state (Dettmers et al. 2022, §2.1) with FP8 E4M3 codes (Micikevicius et al. 2022): one
    absmax scale per block of 256, about 6 % relative precision over five decades below it; writes codes and scale."""
    flat = x.flatten()
    blocks = (flat if flat.numel() == codes.numel() else F.pad(flat, (0, codes.numel() - flat.numel()))).view_as(codes)
    torch.maximum(blocks.amax(1, keepdim=True), blocks.amin(1, keepdim=True).neg_(), out=scale)
    scale.clamp_(min=torch.finfo(torch.float32).tiny).div_(FP8_MAX)
    codes.copy_(blocks / scale)


def dequantize_blockwise(codes: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return codes.float().mul_(scale).flatten()[:shape.numel()].view(shape)


class Moment:
    """One Adam moment of a tensor, stored in fp32, bf16 or blockwise fp8 in buffers allocated once, read and written
    in fp32 (fresh allocations every step fragment a CPU process's heap)."""

    def __init__(self, p: torch.Tensor, storage: str):
        self.shape, blocks = p.shape, -(-p.numel() // BLOCK)
        if storage == "fp8":
            self.codes = torch.zeros(blocks, BLOCK, dtype=torch.float8_e4m3fn, device=p.device)
            self.scale = torch.ones(blocks, 1, device=p.device)
        else:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[storage]
            self.codes, self.scale = torch.zeros_like(p, dtype=dtype), None

    def get(self) -> torch.Tensor:
        return self.codes.float() if self.scale is None else dequantize_blockwise(self.codes, self.scale, self.shape)

    def set(self, x: torch.Tensor) -> None:
        if self.scale is None:
            self.codes.copy_(x)
        else:
            quantize_blockwise_(x, self.codes, self.scale)


# The second moment stays bf16: an 8-bit v can round a small entry to zero and make its update unbounded, whereas an
# 8-bit m rounds to zero or to at most twice itself, which bounds its update.
MOMENTS = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "8-bit": ("fp8", "bf16")}


class TensorAdam:
    """Adam (Kingma & Ba 2015, Alg. 1) on one tensor, moments stored as MOMENTS[moments] and updated in fp32."""

    def __init__(self, p: torch.Tensor, lr: float, eps: float, moments: str, betas=(0.9, 0.999)):
        self.lr, self.eps, self.betas, self.t = lr, eps, betas, 0
        self.m, self.v = (Moment(p, storage) for storage in MOMENTS[moments])

    @torch.no_grad()
    def __call__(self, p: torch.Tensor) -> None:
        """Step with p.grad, then free it."""
        b1, b2 = self.betas
        self.t += 1
        m = self.m.get().lerp_(p.grad, 1 - b1)
        v = self.v.get().mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        self.m.set(m)
        self.v.set(v)
        p.addcdiv_(m, (v / (1 - b2**self.t)).sqrt_().add_(self.eps), value=-self.lr / (1 - b1**self.t))
        p.grad = None


class LossScale:
    """Dynamic loss scaling for fp16 compute (Micikevicius et al. 2018, §3.2): the loss is multiplied by S; a step whose
    gradients overflow is skipped and S halves; S doubles after `interval` steps without overflow."""

    def __init__(self, scale: float = 1024.0, interval: int = 50):
        self.scale, self.interval, self.clean = scale, interval, 0

    @torch.no_grad()
    def unscale(self, params: list[torch.Tensor]) -> bool:
        """Divide the gradients by S; False (and S halved, gradients dropped) when any is not finite."""
        grads = [p.grad for p in params if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            self.scale, self.clean = self.scale / 2, 0
            for p in params:
                p.grad = None
            return False
        torch._foreach_div_(grads, self.scale)
        self.clean += 1
        if self.clean == self.interval:
            self.scale, self.clean = self.scale * 2, 0
        return True


class Adam:
    """Adam over parameter groups with moments stored as MOMENTS[moments]. fused: each tensor steps as soon as its
    gradient is complete and the gradient is freed, so no full-model gradient buffer exists (Adam is element-wise: the
    same mathematics). A loss scale (fp16) needs the whole gradient before stepping, so it cannot be fused. Use as a
    context manager: the fused step's backward hooks are removed on exit."""

    def __init__(self, groups: list[dict], moments: str = "fp32", fused: bool = False, loss_scale: LossScale | None = None):
        if fused and loss_scale is not None:
            raise ValueError("a loss-scaled (fp16) step must see every gradient first: it cannot be fused")
        self.params = [p for g in groups for p in g["params"]]
        self.fused, self.loss_scale, self.hooks = fused, loss_scale, []
        if moments == "fp32" and not fused:
            self.torch_adam, self.steppers = torch.optim.Adam(groups, eps=1e-8), {}
            return
        self.torch_adam = None
        self.steppers = {p: TensorAdam(p, g["lr"], 1e-8, moments) for g in groups for p in g["params"]}
        if fused:
            self.hooks = [p.register_post_accumulate_grad_hook(self.steppers[p]) for p in self.params]

    @property
    def scale(self) -> float:
        return self.loss_scale.scale if self.loss_scale else 1.0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> bool:
        """Apply the accumulated gradients (already applied when fused); False when an fp16 overflow skipped the step."""
        if self.fused:
            return True
        if self.loss_scale and not self.loss_scale.unscale(self.params):
            logging.warning("fp16 gradients overflowed: step skipped, loss scale now %g", self.loss_scale.scale)
            return False
        if self.torch_adam is not None:
            self.torch_adam.step()
        else:
            for p in self.params:
                if p.grad is not None:
                    self.steppers[p](p)
        return True

    def __enter__(self) -> "Adam":
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
