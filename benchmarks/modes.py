"""Training modes side by side: one image through vanilla Forgedit, Imagic (paper / diffusers recipes),
Forgedit-Imagic and DreamBooth+Forgedit, each with its own recipe, on the same random weights and shapes.

    python benchmarks/modes.py --size {tiny,shallow,full} --resolution 256 [--precision fast] [--json]

Each mode runs in its own process. Its seconds per step are timed over a few steps after a warm-up and then scaled
to the recipe's step count. Peak memory is that process's peak RSS on the CPU, torch.cuda.max_memory_allocated on a GPU.
"""
import argparse
import json
import subprocess
import sys
import time

import torch
from common import SIZES, benchmark_parser, comfy_model, device_name, diffusers_unet, peak_mb

# mode: (batch size, steps per stage); Imagic's two stages are timed separately.
MODES = {"forgedit": (10, (40,)), "imagic (paper)": (1, (1000, 1500)), "imagic (diffusers)": (1, (500, 1000)),
         "forgedit-imagic": (1, (400, 1000)), "dreambooth-forgedit": (4, (100,))}


def text_encoder(size: str):
    """SD1.x's CLIP text encoder shape (ViT-L/14 text tower: 12 layers of 768), or the tests' tiny one."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from tiny_models import init_weights, tiny_clip

    if size == "tiny":
        return tiny_clip(SIZES[size][1])
    options = {"clip_l_model_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                                       "num_hidden_layers": 12, "projection_dim": 768}, "dtype": torch.float32}
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options=options)
    init_weights(clip.cond_stage_model, 1)
    return clip


def measure(args) -> dict:
    import conftest

    import comfy.model_management

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pack = conftest._PACK
    model, _ = comfy_model(args.size, diffusers_unet(args.size), comfy.model_management.unet_dtype())
    batch, recipe = MODES[args.mode]
    n = args.warmup + args.iterations
    training = pack.nodes.training
    method = training.METHODS[pack.forgedit_ops.imagic.RECIPES[args.mode].method if args.mode.startswith(
        ("imagic", "forgedit-imagic")) else args.mode]
    options = training.training_options(args.precision, model,
                                        training.run_size(model, method, batch, args.resolution, args.resolution))
    cfg = pack.forgedit_ops.finetune.FinetuneConfig(samples=n * batch, batch_size=batch, **options)
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(1, 4, args.resolution // 8, args.resolution // 8, generator=g)
    e = torch.randn(1, 77, SIZES[args.size][1], generator=g)
    stamps = []

    def tick(step, loss):
        stamps.append(time.perf_counter())

    clip = text_encoder(args.size) if method.name == "dreambooth-forgedit" else None
    job = training.Job(clip, z0, e, cfg, {"text_steps": n, "unet_steps": n, "source_prompt": "a photo of a bird"})
    start = time.perf_counter()
    training.train_method(method, job, model, n * len(recipe), callback=tick)
    steps = [b - a for a, b in zip([start, *stamps], stamps)]
    per_stage = [steps[i * n + args.warmup:(i + 1) * n] for i in range(len(recipe))]
    seconds = [sum(s) / len(s) * count for s, count in zip(per_stage, recipe)]
    return {"seconds": round(sum(seconds), 2), "seconds_per_stage": [round(s, 2) for s in seconds],
            "peak_mb": round(peak_mb(device)), "device": device_name(device)}


def main():
    parser = benchmark_parser(__doc__)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return
    runs = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True, text=True)
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {
            "error": f"exit {out.returncode}: {(out.stderr.strip().splitlines() or [''])[-1]}"}
    device = next((r.pop("device") for r in runs.values() if "device" in r), "?")
    for r in runs.values():
        r.pop("device", None)
    report = {"device": device, "size": args.size, "resolution": args.resolution, "precision": args.precision, **runs}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.size} @ {args.resolution}px on {device}, precision {args.precision}; one image, each mode's recipe")
    for mode, run in runs.items():
        print(f"  {mode:20s} " + (run["error"] if "error" in run else
                                  f"{run['seconds']:9.1f} s {run['seconds_per_stage']}   peak {run['peak_mb']} MB"))


if __name__ == "__main__":
    main()
