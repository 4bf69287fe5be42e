"""Fine-tune benchmark: the reference recipe (diffusers UNet, fp32, batch 10, Adam over Forgedit's trained set, a
second fp32 UNet kept for forgetting) against this pack's fine-tune, on the same random weights and shapes.

    python benchmarks/finetune.py --size {tiny,shallow,full} --resolution 256 [--preset fast] [--json]

Each side runs in its own process, timed over a few iterations after a warm-up and scaled to 400 samples; peak memory
is that process's peak RSS on the CPU, torch.cuda.max_memory_allocated on a GPU.
"""
import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
# block_out_channels, cross-attention width. shallow: the SD1.5 block layout with 320 channels at every level.
SIZES = {"tiny": ((32, 64, 128, 128), 32), "shallow": ((320,) * 4, 768), "full": ((320, 640, 1280, 1280), 768)}
BATCH, SAMPLES = 10, 400


def diffusers_unet(size: str):
    from diffusers import UNet2DConditionModel

    channels, context = SIZES[size]
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=2, cross_attention_dim=context, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32, flip_sin_to_cos=True,
        freq_shift=0, use_linear_projection=False)


def inputs(size: str, resolution: int, device):
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(1, 4, resolution // 8, resolution // 8, generator=g)
    return z0.to(device), torch.randn(1, 77, SIZES[size][1], generator=g).to(device)


def reference(args, device) -> list[float]:
    """Forgedit's train(): fp32, Adam(UNet subset 6e-5, e_src 1e-3), batch 10 of one latent, ε-MSE."""
    from diffusers import DDIMScheduler

    unet = diffusers_unet(args.size).to(device)
    unet_orig = copy.deepcopy(unet)  # the reference keeps the pretrained UNet for forgetting
    unet.requires_grad_(False)
    trained = [p for n, p in unet.named_parameters()
               if ("down_blocks" in n and "down_blocks.0" not in n) or ("up_blocks" in n and "up_blocks.0" not in n)]
    for p in trained:
        p.requires_grad_(True)
    z0, e = inputs(args.size, args.resolution, device)
    e = torch.nn.Parameter(e)
    opt = torch.optim.Adam([{"params": trained, "lr": 6e-5}, {"params": [e], "lr": 1e-3}])
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    times = []
    for _ in range(args.warmup + args.iterations):
        start = time.perf_counter()
        t = torch.randint(0, 1000, (BATCH,), device=device)
        noise = torch.randn((BATCH, *z0.shape[1:]), device=device)
        x_t = sched.add_noise(z0.repeat(BATCH, 1, 1, 1), noise, t)
        eps = unet(x_t, t, encoder_hidden_states=e.repeat(BATCH, 1, 1)).sample
        loss = torch.nn.functional.mse_loss(eps, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
        times.append(time.perf_counter() - start)
    del unet_orig
    return times


def ours(args, device) -> list[float]:
    """The Forgedit Fine-tune node's training function on a ComfyUI MODEL holding the same weights."""
    sys.path.insert(0, str(TESTS))
    import conftest  # imports ComfyUI as a library and loads this pack as the server does

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from tiny_sd15 import sd15_unet_config

    channels, context = SIZES[args.size]
    config = comfy.supported_models.SD15(sd15_unet_config(channels[0], context) | {"channel_mult": [c // channels[0] for c in channels]})
    config.set_inference_dtype(comfy.model_management.unet_dtype(), None)
    with torch.inference_mode():
        base = config.get_model({}, "", device=torch.device("cpu"))
        to_ldm = comfy.utils.unet_to_diffusers(config.unet_config)
        base.diffusion_model.load_state_dict({to_ldm[k]: v for k, v in diffusers_unet(args.size).state_dict().items()})
    model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=comfy.model_management.unet_offload_device())
    finetune = conftest._PACK.nodes.finetune
    options = finetune.training_options(args.preset, device)
    cfg = conftest._PACK.forgedit_ops.finetune.FinetuneConfig(samples=(args.warmup + args.iterations) * BATCH, **options)
    stamps = [time.perf_counter()]
    z0, e = inputs(args.size, args.resolution, device)
    finetune.finetune_unet(model, z0, e, cfg, callback=lambda step, loss: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def measure(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times = (reference if args.role == "reference" else ours)(args, device)
    timed = times[args.warmup:]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"seconds_per_400_samples": round(sum(timed) / len(timed) * SAMPLES / BATCH, 2), "peak_mb": round(peak),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--preset", default="fast", help="the pack's preset: auto, exact, fast, low memory")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--role", choices=["reference", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        print(json.dumps(measure(args)))
        return
    runs = {}
    for role in ("reference", "ours"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--role", role], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"the {role} run failed:\n{out.stderr[-3000:]}")
        runs[role] = json.loads(out.stdout.strip().splitlines()[-1])
    report = {"device": runs["ours"].pop("device"), "size": args.size, "resolution": args.resolution, "preset": args.preset,
              "ours": runs["ours"], "reference": {k: v for k, v in runs["reference"].items() if k != "device"},
              "speedup": round(runs["reference"]["seconds_per_400_samples"] / runs["ours"]["seconds_per_400_samples"], 2),
              "memory_ratio": round(runs["ours"]["peak_mb"] / runs["reference"]["peak_mb"], 2)}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['size']} @ {args.resolution}px on {report['device']}, preset {args.preset}")
        for side in ("reference", "ours"):
            print(f"  {side:9s} {report[side]['seconds_per_400_samples']:9.1f} s / 400 samples   peak {report[side]['peak_mb']} MB")
        print(f"  speedup {report['speedup']}x   memory ratio {report['memory_ratio']}")


if __name__ == "__main__":
    main()
