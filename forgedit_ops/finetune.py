"""Joint vision-language optimisation: the source embedding and a UNet subset fine-tuned together (Forgedit §3)."""
import copy
import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .optim import Adam, LossScale


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
    prediction: str = "eps"

    @property
    def iterations(self) -> int:
        return self.samples // self.batch_size

    @property
    def compute_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


def trainable_copy(module: nn.Module, is_trained: Callable[[str], bool], device,
                   compute_dtype: torch.dtype = torch.float32,
                   drop: Iterable[str] = ()) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """A structural copy of `module` for training on `device`: trained tensors become fp32 master parameters. Frozen
    matrices and kernels stay `module`'s own tensors when autocast to a `compute_dtype` other than theirs makes a fresh
    copy at every use (so none of them is saved for backward) or when they already are `compute_dtype` on `device`
    (then read in place through an ordinary tensor on their storage: a host's inference tensors cannot be saved for
    backward), else become copies in `compute_dtype`; norm weights and biases are fp32 copies (CPU norms reject mixed
    dtypes). Submodule attributes named in `drop` (a host's runtime handles, which may not be copyable) are left out of
    the copy. `module` is left untouched."""
    memo, params, drop = {}, {}, tuple(drop)
    for name, p in module.named_parameters():
        trained = is_trained(name)
        if trained or p.dim() < 2:
            fresh = nn.Parameter(_plain(p, device, torch.float32), requires_grad=trained)
        elif compute_dtype not in (torch.float32, p.dtype) and p.device.type == device.type:
            fresh = nn.Parameter(p.detach(), requires_grad=False)
        elif p.dtype == compute_dtype and p.device == torch.device(device):
            fresh = nn.Parameter(_alias(p), requires_grad=False)
        else:
            fresh = nn.Parameter(_plain(p, device, compute_dtype), requires_grad=False)
        memo[id(p)] = fresh
        if trained:
            params[name] = fresh
    for b in module.buffers():
        memo[id(b)] = _plain(b, device, compute_dtype)
    dropped = [(m, name) for m in module.modules() for name in drop if name in vars(m)]
    for m, name in dropped:
        memo[id(vars(m)[name])] = None
    student = copy.deepcopy(module, memo)
    for m in student.modules():
        for name in drop:
            vars(m).pop(name, None)
    return student, params


def _alias(t: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor on `t`'s storage (no copy), even when `t` is an inference tensor; call outside inference mode."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(),
                                                               t.stride())


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


def velocity(z0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """The v-prediction target v = √ᾱ_t·ε − √(1 − ᾱ_t)·z0 (Salimans & Ho 2022, §4; SD 2.x 768-v)."""
    a = abar_t.view(-1, *([1] * (noise.dim() - 1)))
    return a.sqrt() * noise - (1 - a).sqrt() * z0


def early_stop(cfg: FinetuneConfig, step: int, loss: float) -> bool:
    """The reference's stop, checked before the batch is applied: loss below 0.03 once past 350 samples."""
    return cfg.early_stop and step * cfg.batch_size > cfg.early_stop_after and loss < cfg.early_stop_loss


def denoising_loop(unet: Callable, groups: list[dict], context: Callable[[], torch.Tensor], z0: torch.Tensor,
                   alphas_cumprod: torch.Tensor, cfg: FinetuneConfig, iterations: int, generator: torch.Generator,
                   callback: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Forgedit §3 / Imagic §3 loop: one Adam over `groups`; each step B copies of the one latent z0 with their own noise
    and timestep, conditioned on context() (1, 77, C); MSE of unet(x_t, t, c) to ε, or to v for a v-prediction model
    (cfg.prediction). Returns the loss per applied step (an fp16 step whose gradients overflow is skipped).
    Micro-batches accumulate the same gradient as the whole batch; compute runs under autocast in cfg.precision."""
    device = z0.device
    micro = cfg.micro_batch or cfg.batch_size
    if cfg.fused_step and micro < cfg.batch_size:
        raise ValueError("fused_step needs the whole batch in one backward pass (micro_batch 0)")
    abar = alphas_cumprod.to(device, torch.float32)
    # No cast cache: each weight is used once per forward, and the cache would hold a bf16 copy of every master.
    autocast = torch.autocast(device.type, dtype=cfg.compute_dtype, enabled=cfg.precision != "fp32", cache_enabled=False)
    losses = []
    with Adam(groups, cfg.moments, cfg.fused_step, LossScale() if cfg.precision == "fp16" else None) as opt:
        for step in range(iterations):
            noise, t = draw_noise_and_timesteps(generator, cfg.batch_size, z0.shape[1:], len(abar))
            noise, t = noise.to(device), t.to(device)
            x_t = q_sample(z0, noise, abar[t])
            target = noise if cfg.prediction == "eps" else velocity(z0, noise, abar[t])
            opt.zero_grad()
            loss = 0.0
            for i in range(0, cfg.batch_size, micro):
                with autocast:
                    out = unet(x_t[i:i + micro], t[i:i + micro], context().expand(len(t[i:i + micro]), -1, -1))
                part = F.mse_loss(out.float(), target[i:i + micro], reduction="sum") / noise.numel()
                loss += part.item()
                if i + micro >= cfg.batch_size and early_stop(cfg, step, loss):
                    return losses
                (part * opt.scale).backward()
            if opt.step():
                losses.append(loss)
            if callback is not None:
                callback(step, loss)
    return losses


def joint_finetune(unet: Callable, params: dict[str, nn.Parameter], e_src: torch.Tensor, z0: torch.Tensor,
                   alphas_cumprod: torch.Tensor, cfg: FinetuneConfig,
                   callback: Optional[Callable[[int, float], None]] = None) -> tuple[torch.Tensor, list[float]]:
    """Forgedit §3: one Adam, UNet subset at unet_lr and e_src at text_lr. Returns the optimised embedding and the loss
    per applied step."""
    e_opt = nn.Parameter(e_src.detach().to(z0.device, torch.float32, copy=True))
    groups = [{"params": list(params.values()), "lr": cfg.unet_lr}, {"params": [e_opt], "lr": cfg.text_lr}]
    losses = denoising_loop(unet, groups, lambda: e_opt, z0, alphas_cumprod, cfg, cfg.iterations,
                            torch.Generator().manual_seed(cfg.seed), callback)
    return e_opt.detach(), losses


def sequential_finetune(unet: Callable, params: dict[str, nn.Parameter], e_init: torch.Tensor, z0: torch.Tensor,
                        alphas_cumprod: torch.Tensor, cfg: FinetuneConfig, text_steps: int, unet_steps: int,
                        callback: Optional[Callable[[int, float], None]] = None):
    """Imagic §3.1: stage 1 optimises e (from e_init) at text_lr with the UNet frozen (no UNet gradients), stage 2
    fine-tunes `params` at unet_lr with e frozen; one noise/timestep stream. Returns (e_opt, stage-1, stage-2 losses)."""
    e_opt = nn.Parameter(e_init.detach().to(z0.device, torch.float32, copy=True))
    generator = torch.Generator().manual_seed(cfg.seed)
    for p in params.values():
        p.requires_grad_(False)
    text_losses = denoising_loop(unet, [{"params": [e_opt], "lr": cfg.text_lr}], lambda: e_opt, z0,
                                 alphas_cumprod, cfg, text_steps, generator, callback)
    e_opt.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    unet_losses = denoising_loop(unet, [{"params": list(params.values()), "lr": cfg.unet_lr}], lambda: e_opt, z0,
                                 alphas_cumprod, cfg, unet_steps, generator,
                                 callback and (lambda step, loss: callback(text_steps + step, loss)))
    return e_opt.detach(), text_losses, unet_losses


def dreambooth_finetune(unet: Callable, unet_params: dict[str, nn.Parameter], text_encoder: Callable[[], torch.Tensor],
                        text_params: dict[str, nn.Parameter], z0: torch.Tensor, alphas_cumprod: torch.Tensor,
                        cfg: FinetuneConfig, callback: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Forgedit §7 (DreamBooth+Forgedit): UNet at unet_lr and text encoder at text_lr in one Adam, the source caption
    re-encoded by the trained encoder (`text_encoder()`) every step. Returns the loss per step."""
    groups = [{"params": list(unet_params.values()), "lr": cfg.unet_lr},
              {"params": list(text_params.values()), "lr": cfg.text_lr}]
    return denoising_loop(unet, groups, text_encoder, z0, alphas_cumprod, cfg, cfg.iterations,
                          torch.Generator().manual_seed(cfg.seed), callback)


@torch.no_grad()
def deltas_in_place(params: dict[str, nn.Parameter], base: nn.Module) -> dict[str, torch.Tensor]:
    """Δ = θ_learned − θ_orig for the trained tensors, fp32 on the CPU (what forgetting merges back, §5). The masters
    become Δ in place (so no second copy of the trained set is allocated): they are unusable afterwards."""
    base_params = dict(base.named_parameters())
    return {k: p.sub_(base_params[k].to(p.device, torch.float32)).detach().cpu() for k, p in params.items()}
