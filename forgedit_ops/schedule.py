"""The reference sampling schedule, DDIM(η=0) with 'leading' spacing, as sigmas for ComfyUI's samplers (Forgedit §6)."""
import math

import torch


def alphas_cumprod(sigmas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t from the discrete VP schedule's σ_t = √((1 − ᾱ_t)/ᾱ_t)."""
    return 1.0 / (1.0 + sigmas.double() ** 2)


def leading_timesteps(steps: int, train_steps: int = 1000) -> list[int]:
    """DDIM 'leading' spacing with steps_offset 0: 50 steps give t = 980, 960, …, 20, 0."""
    if not 1 <= steps <= train_steps:
        raise ValueError(f"steps must be between 1 and {train_steps}, got {steps}")
    ratio = train_steps // steps
    return [i * ratio for i in reversed(range(steps))]


def reference_sigmas(model_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """σ at the leading timesteps and no trailing 0: Euler on these steps is exactly DDIM(η=0) ending at ᾱ_0."""
    return model_sigmas[leading_timesteps(steps, len(model_sigmas))].float()


def is_max_denoise(sigma_start: float, sigma_max: float) -> bool:
    """ComfyUI's test for starting from pure noise (then it scales unit noise by √(1+σ²) itself)."""
    return math.isclose(sigma_max, sigma_start, rel_tol=1e-05) or sigma_start > sigma_max


def ddim_noise_scale(sigma_start: float, sigma_max: float) -> float:
    """Factor on unit noise so ComfyUI's x_T = σ·noise equals DDIM's x_T = z_T/√ᾱ = z_T·√(1+σ²)."""
    return 1.0 if is_max_denoise(sigma_start, sigma_max) else math.sqrt(1 + sigma_start**2) / sigma_start


def ddim_final_scale(sigma_end: float) -> float:
    """DDIM returns z = √ᾱ·x at its last timestep; ComfyUI returns x."""
    return 1.0 / math.sqrt(1 + sigma_end**2)
