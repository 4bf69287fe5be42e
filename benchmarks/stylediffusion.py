"""StyleDiffusion training benchmark: seconds per training iteration and peak memory of the official recipe and of
this pack's, on the same random SD1.5-layout UNet and ViT-B/16-shaped image encoder.

    python benchmarks/stylediffusion.py --layout {shallow,full} [--size 256] [--iterations 3] [--warmup 1]
                                        [--precision exact fast] [--device auto|cpu|cuda] [--json]
    python benchmarks/stylediffusion.py --layout full --size 512 --precision fast --whole     # a GPU: ours, whole run

One iteration is one step of the inner loop at DDIM step i = 0 (t = 957): the cond UNet forward with the mapped
values, L_rec + L_att, backward to the mapping network and one Adam step. Both sides compute ε_∅ and the attention
targets once before the iterations (the official computes ε_∅ once per DDIM step), untimed.

- reference: the official recipe as design note §1.2 #8, #15 and §6 describe it (its code has no licence and is not
  used): one fp32 UNet (the one loaded), every attention layer (self and cross, 16 blocks x 2) an explicit fp32
  softmax through patches_replace, and in every cross-attention call (attn2_patch) the image encoder re-run on the
  preprocessed image with gradients on its parameters (the official leaves CLIP trainable; fp16 on CUDA as clip.load,
  fp32 on a CPU), then the mapping network, then values c⊙γ + β. Maps with ≤ 32² queries are kept with their graph;
  L_att over the 16²-query cross maps.
- ours: the Forgedit StyleDiffusion Train node's core: a training copy of the MODEL (nodes.training.training_copy at
  the preset's precision), make_attend (SDPA except the 5 map layers), E(x) once, forgedit_ops train_step.

Each row runs in its own process. Memory: peak = the process's peak RSS on a CPU, torch.cuda.max_memory_allocated on
a GPU; Δ = peak minus the memory held once the MODEL and the image encoder are built and loaded (what training adds).
--whole runs our row over the whole schedule instead (inversion T = 30, inner steps 100: 1015 iterations, no early
stop) and prints its total seconds and peak memory. Pin CPU runs, e.g. `taskset -c 1 env OMP_NUM_THREADS=1 python ...`.
"""
import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
from common import SIZES, comfy_model, diffusers_unet, sync

LAYOUTS = ("shallow", "full")
PRESETS = ("exact", "fast", "low memory", "auto")
T, GUIDANCE, STEPS, INNER = 957, 7.5, 30, 100  # training step i = 0 of T = 30 (t = 957); paper's 100 inner steps
# The 16 SD1.x transformer blocks, each with attn1 (self) and attn2 (cross).
BLOCKS = [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)] + [("output", i, 0) for i in range(3, 12)]


def memory_mb(device, peak: bool) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def clock() -> tuple[float, float]:
    """(wall, this process's CPU) seconds: on a shared CPU the second is what the work itself took."""
    return time.perf_counter(), time.process_time()


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    return f"{cpu}, {torch.get_num_threads()} torch thread(s)"


def setup(args, device, dtype: torch.dtype) -> SimpleNamespace:
    """The MODEL (same seeded weights on both sides, in `dtype`), a ViT-B/16-shaped random image encoder (width 768),
    both loaded on the device, and the inputs of one training step; then the memory baseline."""
    import conftest

    import comfy.model_management
    from tiny_models import init_weights

    pack = conftest._PACK
    model, _ = comfy_model(args.layout, diffusers_unet(args.layout), dtype)
    encoder = pack.nodes.image_encoder
    with open(encoder.CONFIG) as f:
        clip_vision = encoder.clip_vision_model(json.load(f))
    init_weights(clip_vision.model, 3)
    with torch.no_grad():  # a bare Parameter that ComfyUI leaves uninitialised
        clip_vision.model.vision_model.embeddings.class_embedding.normal_(0, 0.02)
    comfy.model_management.load_models_gpu([model, clip_vision.patcher], force_full_load=True)
    g = torch.Generator().manual_seed(1)
    latent = lambda: torch.randn(1, 4, args.size // 8, args.size // 8, generator=g)
    s = SimpleNamespace(pack=pack, model=model, clip_vision=clip_vision, z=latent(), target=latent(),
                        context=torch.randn(1, 77, SIZES[args.layout][1], generator=g),
                        uncond=torch.randn(1, 77, SIZES[args.layout][1], generator=g),
                        image=torch.rand(1, args.size, args.size, 3, generator=g),
                        params=sum(p.numel() for p in model.model.diffusion_model.parameters()))
    s.abar = pack.forgedit_ops.schedule.alphas_cumprod(model.get_model_object("model_sampling").sigmas)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    s.base_mb = memory_mb(device, peak=False)
    return s


def trainable_encoder(vision) -> None:
    """Gradients on the encoder's parameters, and its layers' residual adds out of place (ComfyUI's add in place,
    which autograd refuses once the weights require grad); the same arithmetic."""
    vision.requires_grad_(True)
    for layer in vision.vision_model.encoder.layers:
        def forward(x, mask=None, optimized_attention=None, layer=layer):
            x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
            return x + layer.mlp(layer.layer_norm2(x))
        layer.forward = forward


def reference_options(s, device, mapping, calls: dict) -> dict:
    """transformer_options of the official recipe: explicit attention everywhere, encoder + mapping in every cross
    layer of a mapped call."""
    ops = s.pack.forgedit_ops
    reference_clip_preprocess, film = ops.image_features.reference_clip_preprocess, ops.stylediffusion.film
    explicit_attention = s.pack.nodes.p2p_attention.explicit_attention
    vision = s.clip_vision.model
    pixels = reference_clip_preprocess(s.image).to(device, s.clip_vision.dtype)

    def encode_and_map(n, context, value, extra):
        if not calls["mapped"]:
            return n, context, value
        e = vision.vision_model.post_layernorm(vision(pixel_values=pixels, intermediate_output=None)[0]).float()
        return n, context, film(context, *mapping(e)).to(context.dtype)

    def attention(q, k, v, extra):
        out, probs = explicit_attention(q, k, v, extra["n_heads"])
        calls["layers"] += 1
        if probs.shape[-2] <= 32 ** 2:
            calls["store"].append(probs)  # kept with its graph until the loss is taken
        if k.shape[1] == 77 and probs.shape[-2] == 16 ** 2:
            calls["loss_maps"].append(probs)
        return out

    replace = {key: attention for key in BLOCKS}
    return {"patches": {"attn2_patch": [encode_and_map]}, "patches_replace": {"attn1": replace, "attn2": dict(replace)}}


def reference(args, device, s) -> list[tuple]:
    """The official per-iteration work on the loaded fp32 UNet; returns (wall, CPU) seconds per iteration."""
    import torch.nn.functional as F

    ddim, sd = s.pack.forgedit_ops.ddim, s.pack.forgedit_ops.stylediffusion
    unet = s.model.model.diffusion_model.requires_grad_(False)
    trainable_encoder(s.clip_vision.model)
    mapping = sd.init_mapping(0).to(device)
    calls = {}
    options = reference_options(s, device, mapping, calls)
    z, target, c, u = (x.to(device) for x in (s.z, s.target, s.context, s.uncond))
    t = torch.full((1,), float(T), device=device)

    def forward(context, mapped):
        calls.update(mapped=mapped, layers=0, store=[], loss_maps=[])
        eps = unet(z, t, context, transformer_options=options).float()
        assert calls["layers"] == 2 * len(BLOCKS), f"{calls['layers']} attention calls, expected {2 * len(BLOCKS)}"
        return eps, calls["loss_maps"]

    with torch.no_grad():
        eps_u, _ = forward(u, False)
        targets = [m.detach() for m in forward(c, False)[1]]
    opt, times = torch.optim.Adam(mapping.parameters(), lr=sd.mapping_lr(0)), []
    for _ in range(args.warmup + args.iterations):
        start = clock()
        eps_c, maps = forward(c, True)
        abar_prev = ddim.abar_before(s.abar, T, 1000 // STEPS)
        z_prev = ddim.ddim_prev(ddim.guided(eps_u, eps_c, GUIDANCE), z, s.abar[T], abar_prev)
        loss = F.mse_loss(z_prev.float(), target) + sd.attention_loss(maps, targets)
        opt.zero_grad()  # the mapping network's only: the encoder's gradients accumulate, as in the official
        loss.backward()
        opt.step()
        calls["store"].clear()
        loss.item()
        sync(device)
        times.append(tuple(b - a for a, b in zip(start, clock())))
    return times


def ours(args, device, s) -> list[tuple]:
    """The node's core: training copy, make_attend, E(x) once, train_step; returns (wall, CPU) s per iteration."""
    abar_before, sd = s.pack.forgedit_ops.ddim.abar_before, s.pack.forgedit_ops.stylediffusion
    run_mod = s.pack.nodes.inversion_run
    features = s.pack.nodes.image_encoder.image_features(s.clip_vision, s.image)
    cfg = run_mod.inversion_precision(s.model, args.precision, args.size, args.size)
    stamps = []
    with s.pack.nodes.training.training_copy(s.model, lambda name: False, cfg, 0) as run:
        attend = run_mod.copy_attend(run, cfg)
        z, target, c, u, e = (x.to(run.device).clone() for x in (s.z, s.target, s.context, s.uncond, features))
        with torch.no_grad():
            targets = [m.detach() for m in attend(z, T, c, None, True)[1]]
        mapping = sd.init_mapping(0, e.shape[1]).to(run.device)
        stamps.append(clock())  # the first interval also holds ε_∅: it is the warm-up
        sd.train_step(attend, z, T, run.abar[T], abar_before(run.abar, T, 1000 // STEPS), target, targets, c, u, e,
                      mapping, 0, GUIDANCE, args.warmup + args.iterations, early_stop=False,
                      callback=lambda *_: (sync(device), stamps.append(clock())))
    args.compute = cfg.precision
    return [tuple(y - x for x, y in zip(a, b)) for a, b in zip(stamps, stamps[1:])]


def whole(args, device, s) -> dict:
    """Our whole training as the node runs it: E(x), inversion with maps (T = 30), 30 mapping nets, no early stop."""
    sd, run_mod = s.pack.forgedit_ops.stylediffusion, s.pack.nodes.inversion_run
    cfg = run_mod.inversion_precision(s.model, args.precision, args.size, args.size)
    start = time.perf_counter()
    features = s.pack.nodes.image_encoder.image_features(s.clip_vision, s.image)
    with s.pack.nodes.training.training_copy(s.model, lambda name: False, cfg, 0) as run:
        attend = run_mod.copy_attend(run, cfg)
        z0, c, u, e = (x.to(run.device).clone() for x in (s.z, s.context, s.uncond, features))
        latents, maps = sd.invert_with_maps(attend, z0, c, run.abar, STEPS)
        mapping = sd.init_mapping(0, e.shape[1]).to(run.device)
        trained = sd.train_mappings(attend, latents, maps, c, u, e, run.abar, mapping, GUIDANCE, INNER,
                                    early_stop=False)
        sync(device)
    args.compute = cfg.precision
    return {"iterations": len(trained.losses), "seconds": round(time.perf_counter() - start, 2)}


def measure(args) -> dict:
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and device.type != "cuda":
        raise SystemExit("--device cuda: no CUDA device")
    import conftest  # noqa: F401  imports ComfyUI as a library and loads this pack, as the tests do

    import comfy.model_management

    s = setup(args, device, torch.float32 if args.role == "reference" else comfy.model_management.unet_dtype())
    args.compute = "fp32"
    out = whole(args, device, s) if args.role == "whole" else {}
    if args.role != "whole":
        times = (reference if args.role == "reference" else ours)(args, device, s)[args.warmup:]
        out["seconds_per_iteration"] = round(sum(w for w, _ in times) / len(times), 3)
        if device.type == "cpu":
            out["cpu_seconds_per_iteration"] = round(sum(c for _, c in times) / len(times), 3)
    peak = memory_mb(device, peak=True)
    return {**out, "compute": args.compute, "peak_mb": round(peak), "delta_mb": round(peak - s.base_mb),
            "params_m": round(s.params / 1e6, 1), "machine": machine(device), "torch": torch.__version__}


def row(args, role: str, precision: str) -> dict:
    """One row in its own process (CUDA hidden from it under --device cpu)."""
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}))
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--role", role, "--precision", precision],
                         capture_output=True, text=True, env=env)
    if out.returncode == 0:
        return json.loads(out.stdout.strip().splitlines()[-1])
    why = "killed (SIGKILL: out of memory?)" if out.returncode == -9 else f"exit {out.returncode}"
    return {"error": f"{why}: {(out.stderr.strip().splitlines() or [''])[-1]}"}


def stamp(info: dict) -> str:
    return f"{info.get('machine')} · torch {info.get('torch')} · {datetime.datetime.now():%Y-%m-%d %H:%M}"


def print_report(args, rows: dict, info: dict) -> None:
    cpu = all("cpu_seconds_per_iteration" in r for r in rows.values() if "error" not in r)
    print(f"StyleDiffusion training, {args.layout} SD1.5 layout ({info.get('params_m')} M params) @ {args.size}², "
          f"{args.warmup} warm-up + {args.iterations} timed iteration(s)")
    print(stamp(info) + (" · load average %.1f %.1f %.1f" % os.getloadavg() if cpu else ""))
    print(f"  {'row':24s} {'s/iter':>9s}" + (f" {'CPU s/iter':>10s}" if cpu else "") + f" {'peak MB':>9s} {'Δ MB':>8s}")
    for name, r in rows.items():
        print(f"  {name:24s} " + (r["error"] if "error" in r else f"{r['seconds_per_iteration']:9.2f}"
              + (f" {r['cpu_seconds_per_iteration']:10.2f}" if cpu else "") + f" {r['peak_mb']:9d} {r['delta_mb']:8d}"))
    ref = rows["reference (fp32)"]
    for name, r in rows.items():
        if name == "reference (fp32)" or "error" in r or "error" in ref:
            continue
        timed = (("seconds_per_iteration", "time"), ("cpu_seconds_per_iteration", "CPU time"))
        parts = [f"{label} {r[key] / ref[key]:.2f} ({ref[key] / r[key]:.1f}x faster)"
                 for key, label in timed if key in r and key in ref]
        parts += [f"{label} {r[key] / ref[key]:.2f}" for key, label in (("peak_mb", "peak"), ("delta_mb", "Δ"))]
        print(f"  {name} / reference: " + ", ".join(parts))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", choices=LAYOUTS, default="shallow")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (a multiple of 8)")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", nargs="+", choices=PRESETS, default=["exact", "fast"], help="our row(s)' preset")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--whole", action="store_true", help="our whole training (1015 iterations) instead; for a GPU")
    p.add_argument("--json", action="store_true")
    p.add_argument("--role", choices=("reference", "ours", "whole"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        args.precision = args.precision[-1]
        print(json.dumps(measure(args)))
        return
    if args.whole:
        rows = {f"ours {preset}": row(args, "whole", preset) for preset in args.precision}
    else:
        rows = {"reference (fp32)": row(args, "reference", "exact")}
        rows.update({f"ours {preset} ({r.get('compute', '?')})": r
                     for preset in args.precision for r in [row(args, "ours", preset)]})
    info = next((r for r in rows.values() if "error" not in r), {})
    if args.json:
        print(json.dumps({"layout": args.layout, "size": args.size, "warmup": args.warmup, "iterations": args.iterations,
                          "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}", "rows": rows}))
    elif args.whole:
        print(f"StyleDiffusion whole training, {args.layout} SD1.5 layout @ {args.size}², T = {STEPS}, inner {INNER}, "
              f"no early stop; " + stamp(info))
        for name, r in rows.items():
            print(f"  {name} ({r.get('compute', '?')}): " + (r["error"] if "error" in r else
                  f"{r['iterations']} iterations, {r['seconds']:.1f} s, peak {r['peak_mb']} MB, Δ {r['delta_mb']} MB"))
    else:
        print_report(args, rows, info)


if __name__ == "__main__":
    main()
