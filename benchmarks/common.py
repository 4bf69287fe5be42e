"""What the benchmarks share: model sizes, the reference recipe's diffusers UNet, its ComfyUI twin holding the same
weights, and peak memory (process RSS on the CPU, allocated bytes on a GPU)."""
import argparse
import resource
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests" / sub) for sub in ("comfy", "")]

# block_out_channels, cross-attention width. shallow: the SD1.5 block layout with 320 channels at every level.
SIZES = {"tiny": ((32, 64, 128, 128), 32), "shallow": ((320,) * 4, 768), "full": ((320, 640, 1280, 1280), 768)}


def reference_trained(name: str) -> bool:
    """Forgedit §3's trained set as the reference selects it, on diffusers names."""
    return ("down_blocks" in name and "down_blocks.0" not in name) or ("up_blocks" in name and "up_blocks.0" not in name)


def diffusers_unet(size: str):
    """The SD1.x UNet2DConditionModel at this size, seeded random weights, fp32."""
    from diffusers import UNet2DConditionModel

    channels, context = SIZES[size]
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=2, cross_attention_dim=context, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32, norm_eps=1e-5,
        flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False, sample_size=64).eval()


def comfy_model(size: str, unet_d, dtype: torch.dtype = torch.float32):
    """A ComfyUI SD1.x MODEL holding the diffusers weights (shared storage when dtype matches); (patcher, diffusers→LDM map)."""
    import conftest  # noqa: F401  imports ComfyUI as a library and loads this pack, as the tests do

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from tiny_models import sd15_unet_config

    channels, context = SIZES[size]
    config = comfy.supported_models.SD15(sd15_unet_config(channels[0], context) | {"channel_mult": [c // channels[0] for c in channels]})
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    to_ldm = comfy.utils.unet_to_diffusers(config.unet_config)
    sd = {to_ldm[k]: v.to(dtype) for k, v in unet_d.state_dict().items()}
    model.diffusion_model.load_state_dict(sd, strict=True, assign=True)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, to_ldm


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The options every training benchmark takes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--precision", default="fast", help="the training nodes' precision: auto, exact, fast, low memory")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--json", action="store_true")
    return p
