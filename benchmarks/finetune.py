"""Fine-tune benchmark: the reference recipe (diffusers UNet, fp32, batch 10, Adam over Forgedit's trained set, a
second fp32 UNet kept for forgetting), the same recipe under the autocast our precision uses, and this pack's
fine-tune, on the same random weights and shapes.

    python benchmarks/finetune.py --size {tiny,shallow,full} --resolution 256 [--precision fast] [--json]

Each side runs in its own process, timed over a few iterations after a warm-up and scaled to 400 samples; ours also
reports its whole wall time (copy, steps, deltas: what the node spends) and its memory estimate. Peak memory is that
process's peak RSS on the CPU, torch.cuda.max_memory_allocated on a GPU.
"""
import argparse
import copy
import json
import subprocess
import sys
import time

import torch
from common import SIZES, benchmark_parser, comfy_model, device_name, diffusers_unet, peak_mb, reference_trained, sync

BATCH, SAMPLES = 10, 400
COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    trained = [p for n, p in unet.named_parameters() if reference_trained(n)]
    for p in trained:
        p.requires_grad_(True)
    z0, e = inputs(args.size, args.resolution, device)
    e = torch.nn.Parameter(e)
    opt = torch.optim.Adam([{"params": trained, "lr": 6e-5}, {"params": [e], "lr": 1e-3}])
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    times = []
    autocast = torch.autocast(device.type, dtype=COMPUTE[args.autocast], enabled=args.autocast != "fp32")
    for _ in range(args.warmup + args.iterations):
        start = time.perf_counter()
        t = torch.randint(0, 1000, (BATCH,), device=device)
        noise = torch.randn((BATCH, *z0.shape[1:]), device=device)
        x_t = sched.add_noise(z0.repeat(BATCH, 1, 1, 1), noise, t)
        with autocast:
            eps = unet(x_t, t, encoder_hidden_states=e.repeat(BATCH, 1, 1)).sample
        loss = torch.nn.functional.mse_loss(eps.float(), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - start)
    del unet_orig
    return times


def ours(args, device) -> list[float]:
    """The Forgedit Fine-tune node's training core on a ComfyUI MODEL holding the same weights."""
    import conftest

    import comfy.model_management

    model, _ = comfy_model(args.size, diffusers_unet(args.size), comfy.model_management.unet_dtype())
    pack = conftest._PACK
    training, method = pack.nodes.training, pack.nodes.training.METHODS["forgedit"]
    size = training.run_size(model, method, BATCH, args.resolution, args.resolution)
    options = training.training_options(args.precision, model, size)
    ours.estimated_mb = round(pack.forgedit_ops.precision.training_bytes(size, options) / 2**20)
    cfg = pack.forgedit_ops.finetune.FinetuneConfig(samples=(args.warmup + args.iterations) * BATCH, **options)
    stamps = [time.perf_counter()]
    z0, e = inputs(args.size, args.resolution, device)
    training.train_method(method, training.Job(None, z0, e, cfg, {}), model, cfg.iterations,
                          callback=lambda step, loss: stamps.append(time.perf_counter()))
    ours.node_seconds = round(time.perf_counter() - stamps[0], 2)
    ours.precision = cfg.precision
    return [b - a for a, b in zip(stamps, stamps[1:])]


def measure(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times = (reference if args.role == "reference" else ours)(args, device)
    timed = times[args.warmup:]
    extra = {"estimated_mb": ours.estimated_mb, "node_seconds": ours.node_seconds,
             "precision": ours.precision} if args.role == "ours" else {}
    return {"seconds_per_400_samples": round(sum(timed) / len(timed) * SAMPLES / BATCH, 2),
            "peak_mb": round(peak_mb(device)), **extra, "device": device_name(device)}


def ratio(a: dict, b: dict, key: str):
    return round(a[key] / b[key], 2) if key in a and key in b else None


def failure(out: subprocess.CompletedProcess) -> str:
    """Why a side's process failed; SIGKILL on Linux is most often the out-of-memory killer."""
    if out.returncode == -9:
        return "killed (SIGKILL: out of memory?)"
    return f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''}"


def side(role: str, autocast: str = "fp32") -> dict:
    """One side in its own process."""
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--role", role, "--autocast", autocast],
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": failure(out)}


def main():
    parser = benchmark_parser(__doc__)
    parser.add_argument("--role", choices=["reference", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--autocast", choices=list(COMPUTE), default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        print(json.dumps(measure(args)))
        return
    runs = {"ours": side("ours"), "reference": side("reference")}
    precision = runs["ours"].get("precision", "fp32")
    if precision != "fp32":
        runs[f"reference {precision}"] = side("reference", precision)
    device = runs["ours"].pop("device", runs["reference"].get("device"))
    for run in runs.values():
        run.pop("device", None)
    speedups = {f"speedup vs {name}": ratio(run, runs["ours"], "seconds_per_400_samples")
                for name, run in runs.items() if name != "ours"}
    report = {"device": device, "size": args.size, "resolution": args.resolution, "precision": args.precision, **runs,
              **speedups, "memory_ratio": ratio(runs["ours"], runs["reference"], "peak_mb")}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['size']} @ {args.resolution}px on {device}, precision {args.precision}")
    for name, run in runs.items():
        node = f"   node {run['node_seconds']} s, estimate {run['estimated_mb']} MB" if "node_seconds" in run else ""
        print(f"  {name:15s} " + (run["error"] if "error" in run else
                                  f"{run['seconds_per_400_samples']:9.1f} s / 400 samples   peak {run['peak_mb']} MB{node}"))
    print("  " + "   ".join(f"{k} {v}x" for k, v in speedups.items()) + f"   memory ratio {report['memory_ratio']}")


if __name__ == "__main__":
    main()
