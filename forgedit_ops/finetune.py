"""Joint vision-language optimisation: the source embedding and a UNet subset fine-tuned together (Forgedit §3)."""
import copy
from dataclasses import dataclass
from typing import Callable, Optional

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

    @property
    def iterations(self) -> int:
        return self.samples // self.batch_size


def trainable_copy(module: nn.Module, is_trained: Callable[[str], bool], device) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """A structural copy of `module` for training: trained tensors become fp32 master parameters, frozen ones plain fp32
    tensors, all on `device`. `module` is left untouched and its (possibly inference-mode) tensors are never saved."""
    memo, params = {}, {}
    for name, p in module.named_parameters():
        fresh = nn.Parameter(_plain(p, device), requires_grad=is_trained(name))
        memo[id(p)] = fresh
        if fresh.requires_grad:
            params[name] = fresh
    for b in module.buffers():
        memo[id(b)] = _plain(b, device)
    return copy.deepcopy(module, memo), params


def _plain(t: torch.Tensor, device) -> torch.Tensor:
    dtype = torch.float32 if t.is_floating_point() else t.dtype
    return t.detach().to(device, dtype, copy=True)


def draw_noise_and_timesteps(generator: torch.Generator, batch: int, shape, train_steps: int = 1000):
    """Forgedit §2 batching: per sample an independent t ~ U{0..T−1} and ε ~ N(0, I), drawn on the CPU (t first)."""
    t = torch.randint(0, train_steps, (batch,), generator=generator)
    noise = torch.randn((batch, *shape), generator=generator)
    return noise, t


def q_sample(z0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """DDPM forward process: x_t = √ᾱ_t·z0 + √(1 − ᾱ_t)·ε."""
    a = abar_t.view(-1, *([1] * (noise.dim() - 1)))
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def joint_finetune(eps_model: Callable, params: dict[str, nn.Parameter], e_src: torch.Tensor, z0: torch.Tensor,
                   alphas_cumprod: torch.Tensor, cfg: FinetuneConfig,
                   callback: Optional[Callable[[int, float], None]] = None) -> tuple[torch.Tensor, list[float]]:
    """Forgedit §3: one Adam, UNet subset at unet_lr and e_src at text_lr; each step B copies of the one latent z0
    with their own noise and timestep, ε-MSE loss. Returns the optimised embedding and the loss per applied step."""
    device = z0.device
    e_opt = nn.Parameter(e_src.detach().to(device, torch.float32, copy=True))
    opt = torch.optim.Adam([{"params": list(params.values()), "lr": cfg.unet_lr}, {"params": [e_opt], "lr": cfg.text_lr}])
    generator = torch.Generator().manual_seed(cfg.seed)
    abar = alphas_cumprod.to(device, torch.float32)
    losses = []
    for step in range(cfg.iterations):
        noise, t = draw_noise_and_timesteps(generator, cfg.batch_size, z0.shape[1:], len(abar))
        noise, t = noise.to(device), t.to(device)
        eps = eps_model(q_sample(z0, noise, abar[t]), t, e_opt.expand(cfg.batch_size, -1, -1))
        loss = F.mse_loss(eps.float(), noise)
        if cfg.early_stop and step * cfg.batch_size > cfg.early_stop_after and loss.item() < cfg.early_stop_loss:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step, losses[-1])
    return e_opt.detach(), losses


@torch.no_grad()
def weight_deltas(params: dict[str, nn.Parameter], base: nn.Module) -> dict[str, torch.Tensor]:
    """Δ = θ_learned − θ_orig for the trained tensors, fp32 on the CPU (what forgetting merges back, §5)."""
    base_params = dict(base.named_parameters())
    return {k: (p - base_params[k].to(p.device, torch.float32)).cpu() for k, p in params.items()}
