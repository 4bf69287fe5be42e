"""Joint vision-language optimisation: the source embedding and a UNet subset fine-tuned together (Forgedit §3)."""
import copy
import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FinetuneConfig:
    samples: int = 400
    batch_size: int = 10
    unet_lr: float = 6e-5
    text_lr: float = 1e-3
    seed: int = 0
    early_stop: bool = False
    early_stop_loss: float = 0.03
    early_stop_after: int = 350
    precision: str = "fp32"
    micro_batch: int = 0
    fused_step: bool = False
    moments: str = "fp32"
    checkpointing: bool = False

    @property
    def iterations(self) -> int:
        return self.samples // self.batch_size

    @property
    def compute_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


PRESETS = ("auto", "exact", "fast", "low memory")


def preset_options(preset: str, device_type: str, bf16: bool, free_memory: float, need_fast: float) -> dict:
    """Training options of a preset. exact: the reference's fp32. fast: autocast to bf16 (fp16 on GPUs without bf16)
    with fp32 masters. low memory: fast + gradient checkpointing + the fused Adam step with 8-bit moments. auto: fast on
    the CPU or when free memory covers `need_fast` bytes, else low memory."""
    low = "bf16" if bf16 else ("fp16" if device_type == "cuda" else "fp32")
    if preset == "auto":
        preset = "fast" if device_type == "cpu" or free_memory >= need_fast else "low memory"
    options = {"exact": dict(precision="fp32"), "fast": dict(precision=low),
               "low memory": dict(precision=low, checkpointing=True, fused_step=True, moments="8-bit")}
    if preset not in options:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return options[preset]


# fp16 gradients underflow without loss scaling. Adam is invariant to a constant gradient scale S once its ε is scaled by
# S too, so a fixed scale with ε·S is exactly plain Adam (no unscaling, no dynamic scaler).
LOSS_SCALE = {"fp32": 1.0, "bf16": 1.0, "fp16": 1024.0}


def trainable_copy(module: nn.Module, is_trained: Callable[[str], bool], device,
                   compute_dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """A structural copy of `module` for training on `device`: trained tensors become fp32 master parameters. Frozen
    matrices and kernels stay `module`'s own tensors when autocast to a `compute_dtype` other than theirs makes a fresh
    copy at every use (so none of them is saved for backward), else become copies in `compute_dtype`; norm weights and
    biases are fp32 copies (CPU norms reject mixed dtypes). `module` is left untouched."""
    memo, params = {}, {}
    for name, p in module.named_parameters():
        trained = is_trained(name)
        if trained or p.dim() < 2:
            fresh = nn.Parameter(_plain(p, device, torch.float32), requires_grad=trained)
        elif compute_dtype not in (torch.float32, p.dtype) and p.device.type == device.type:
            fresh = nn.Parameter(p.detach(), requires_grad=False)
        else:
            fresh = nn.Parameter(_plain(p, device, compute_dtype), requires_grad=False)
        memo[id(p)] = fresh
        if trained:
            params[name] = fresh
    for b in module.buffers():
        memo[id(b)] = _plain(b, device, compute_dtype)
    return copy.deepcopy(module, memo), params


def _plain(t: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(device, dtype if t.is_floating_point() else t.dtype, copy=True)


def checkpoint_modules(modules: Iterable[nn.Module]) -> None:
    """Gradient checkpointing: each module keeps only its inputs and recomputes its activations during backward."""
    for m in modules:
        m.forward = functools.partial(torch.utils.checkpoint.checkpoint, m.forward, use_reentrant=False)


def draw_noise_and_timesteps(generator: torch.Generator, batch: int, shape, train_steps: int = 1000):
    """Forgedit §2 batching: per sample an independent t ~ U{0..T−1} and ε ~ N(0, I), drawn on the CPU (t first)."""
    t = torch.randint(0, train_steps, (batch,), generator=generator)
    noise = torch.randn((batch, *shape), generator=generator)
    return noise, t


def q_sample(z0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """DDPM forward process: x_t = √ᾱ_t·z0 + √(1 − ᾱ_t)·ε."""
    a = abar_t.view(-1, *([1] * (noise.dim() - 1)))
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


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


def adam(groups: list[dict], eps: float, fused_step: bool, moments: str):
    """Adam over the parameter groups. fused_step: each tensor steps as soon as its gradient is complete and the
    gradient is freed, so no full-model gradient buffer exists (Adam is element-wise: the same mathematics)."""
    if not fused_step:
        if moments != "fp32":
            raise ValueError("reduced-precision Adam moments need fused_step")
        return torch.optim.Adam(groups, eps=eps)
    for group in groups:
        for p in group["params"]:
            p.register_post_accumulate_grad_hook(TensorAdam(p, group["lr"], eps, moments))
    return None


def early_stop(cfg: FinetuneConfig, step: int, loss: float) -> bool:
    """The reference's stop, checked before the batch is applied: loss below 0.03 once past 350 samples."""
    return cfg.early_stop and step * cfg.batch_size > cfg.early_stop_after and loss < cfg.early_stop_loss


def denoising_loop(eps_model: Callable, groups: list[dict], context: Callable[[], torch.Tensor], z0: torch.Tensor,
                   alphas_cumprod: torch.Tensor, cfg: FinetuneConfig, iterations: int, generator: torch.Generator,
                   callback: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Forgedit §3 / Imagic §3 loop: one Adam over `groups`; each step B copies of the one latent z0 with their own noise
    and timestep, conditioned on context() (1, 77, C), ε-MSE loss. Returns the loss per applied step. Micro-batches
    accumulate the same gradient as the whole batch; compute runs under autocast in cfg.precision."""
    device = z0.device
    scale = LOSS_SCALE[cfg.precision]
    micro = cfg.micro_batch or cfg.batch_size
    if cfg.fused_step and micro < cfg.batch_size:
        raise ValueError("fused_step needs the whole batch in one backward pass (micro_batch 0)")
    opt = adam(groups, 1e-8 * scale, cfg.fused_step, cfg.moments)
    abar = alphas_cumprod.to(device, torch.float32)
    # No cast cache: each weight is used once per forward, and the cache would hold a bf16 copy of every master.
    autocast = torch.autocast(device.type, dtype=cfg.compute_dtype, enabled=cfg.precision != "fp32", cache_enabled=False)
    losses = []
    for step in range(iterations):
        noise, t = draw_noise_and_timesteps(generator, cfg.batch_size, z0.shape[1:], len(abar))
        noise, t = noise.to(device), t.to(device)
        x_t = q_sample(z0, noise, abar[t])
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = 0.0
        for i in range(0, cfg.batch_size, micro):
            with autocast:
                eps = eps_model(x_t[i:i + micro], t[i:i + micro], context().expand(len(t[i:i + micro]), -1, -1))
            part = F.mse_loss(eps.float(), noise[i:i + micro], reduction="sum") / noise.numel()
            loss += part.item()
            if i + micro >= cfg.batch_size and early_stop(cfg, step, loss):
                return losses
            (part * scale).backward()
        if opt is not None:
            opt.step()
        losses.append(loss)
        if callback is not None:
            callback(step, loss)
    return losses


def joint_finetune(eps_model: Callable, params: dict[str, nn.Parameter], e_src: torch.Tensor, z0: torch.Tensor,
                   alphas_cumprod: torch.Tensor, cfg: FinetuneConfig,
                   callback: Optional[Callable[[int, float], None]] = None) -> tuple[torch.Tensor, list[float]]:
    """Forgedit §3: one Adam, UNet subset at unet_lr and e_src at text_lr. Returns the optimised embedding and the loss
    per applied step."""
    e_opt = nn.Parameter(e_src.detach().to(z0.device, torch.float32, copy=True))
    groups = [{"params": list(params.values()), "lr": cfg.unet_lr}, {"params": [e_opt], "lr": cfg.text_lr}]
    losses = denoising_loop(eps_model, groups, lambda: e_opt, z0, alphas_cumprod, cfg, cfg.iterations,
                            torch.Generator().manual_seed(cfg.seed), callback)
    return e_opt.detach(), losses


def sequential_finetune(eps_model: Callable, params: dict[str, nn.Parameter], e_init: torch.Tensor, z0: torch.Tensor,
                        alphas_cumprod: torch.Tensor, cfg: FinetuneConfig, text_steps: int, unet_steps: int,
                        callback: Optional[Callable[[int, float], None]] = None):
    """Imagic §3.1: stage 1 optimises e (from e_init) at text_lr with the UNet frozen (no UNet gradients), stage 2
    fine-tunes `params` at unet_lr with e frozen; one noise/timestep stream. Returns (e_opt, stage-1, stage-2 losses)."""
    e_opt = nn.Parameter(e_init.detach().to(z0.device, torch.float32, copy=True))
    generator = torch.Generator().manual_seed(cfg.seed)
    for p in params.values():
        p.requires_grad_(False)
    text_losses = denoising_loop(eps_model, [{"params": [e_opt], "lr": cfg.text_lr}], lambda: e_opt, z0,
                                 alphas_cumprod, cfg, text_steps, generator, callback)
    e_opt.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    unet_losses = denoising_loop(eps_model, [{"params": list(params.values()), "lr": cfg.unet_lr}], lambda: e_opt, z0,
                                 alphas_cumprod, cfg, unet_steps, generator,
                                 callback and (lambda step, loss: callback(text_steps + step, loss)))
    return e_opt.detach(), text_losses, unet_losses


def dreambooth_finetune(eps_model: Callable, unet_params: dict[str, nn.Parameter], text_encoder: Callable[[], torch.Tensor],
                        text_params: dict[str, nn.Parameter], z0: torch.Tensor, alphas_cumprod: torch.Tensor,
                        cfg: FinetuneConfig, callback: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Forgedit §7 (DreamBooth+Forgedit): UNet at unet_lr and text encoder at text_lr in one Adam, the source caption
    re-encoded by the trained encoder (`text_encoder()`) every step. Returns the loss per step."""
    groups = [{"params": list(unet_params.values()), "lr": cfg.unet_lr},
              {"params": list(text_params.values()), "lr": cfg.text_lr}]
    return denoising_loop(eps_model, groups, text_encoder, z0, alphas_cumprod, cfg, cfg.iterations,
                          torch.Generator().manual_seed(cfg.seed), callback)


@torch.no_grad()
def weight_deltas(params: dict[str, nn.Parameter], base: nn.Module) -> dict[str, torch.Tensor]:
    """Δ = θ_learned − θ_orig for the trained tensors, fp32 on the CPU (what forgetting merges back, §5). Computed in
    place: the masters become Δ, so no second copy of the trained set is allocated after training."""
    base_params = dict(base.named_parameters())
    return {k: p.sub_(base_params[k].to(p.device, torch.float32)).detach().cpu() for k, p in params.items()}
