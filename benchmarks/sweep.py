"""Benchmark: a 3 gamma x 4 seed Forgedit edit sweep after the fine-tune, the reference's way vs this pack's nodes.

reference (Forgedit spec §5, §6, §10): for each image deep-copy the learned UNet, merge the forgetting strategy
against the original UNet, and run a batch-2 fp32 CFG DDIM loop with diffusers. ours: Forgedit Forget + Forgedit
Sampler in a ComfyUI imported as a library (tests/conftest.py). Same random weights, deltas, embeddings and VAE on both
sides; each side runs in its own subprocess (hidden --role flag) so that its peak memory is its own.

    python benchmarks/sweep.py --size tiny --resolution 256 --steps 50 [--batch-size 12] [--json]
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SIZES, comfy_model, device_name, diffusers_unet, peak_mb, reference_trained, reset_peak, sync
GAMMAS, SEEDS, CFG, STRATEGY, DEGREE, DELTA_SCALE = [0.5, 0.6, 0.7], [0, 1, 2, 3], 7.5, "encoderattn", 0.0, 1e-3
NOTE = ("Per-image CLIP re-encoding of the target and '' prompts is skipped in the reference (it would only make the "
        "reference slower: the comparison is conservative). Both sides decode with the same tiny ComfyUI VAE and "
        "`seconds` includes decoding (`decode_seconds` is its share; ours measured by decoding the same latents once "
        "more). Random weights: base + 1e-3*randn deltas on the trained set, strategy encoderattn, degree 0, CFG 7.5, "
        "DDIM leading timesteps. Each side is timed cold in a fresh process (first-call warm-up included on both). "
        "load_avg (1, 5, 15 min, taken after the runs) shows how busy the machine was. peak_mb: CPU = max RSS of "
        "that side's process (torch + ComfyUI imports included); CUDA = torch.cuda.max_memory_allocated during the "
        "sweep. latent_rel_diff = max |ours - reference| / max |reference| over the 12 final latents (same edits on "
        "both sides).")


def is_forgotten(name: str) -> bool:
    """Forgedit §5 `encoderattn`, the reference's rule on diffusers names."""
    return "down_blocks" in name and "down_blocks.0" not in name and "attn" not in name


def deltas(unet):
    """Yield (diffusers name, small random delta) for the trained set: what the fine-tune 'learned'."""
    import torch

    g = torch.Generator().manual_seed(1)
    for name, p in unet.named_parameters():
        if reference_trained(name):
            yield name, DELTA_SCALE * torch.randn(p.shape, generator=g)


def embeddings(context: int):
    """Source, target and empty-prompt embeddings (1, 77, C) standing in for CLIP's."""
    import torch

    return torch.randn(3, 1, 77, context, generator=torch.Generator().manual_seed(2)).unbind(0)


def reference_images(learned, orig, vae, e_src, e_tgt, uncond, res: int, steps: int, device):
    """The reference's edit loop: per image deepcopy + forgetting merge + one batch-2 CFG DDIM run + decode."""
    import torch
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    latents, decode_s = [], 0.0
    for seed in SEEDS:
        for gamma in GAMMAS:
            unet = copy.deepcopy(learned)
            with torch.no_grad():
                for (name, p), (_, p_orig) in zip(unet.named_parameters(), orig.named_parameters()):
                    if is_forgotten(name):
                        p.copy_(DEGREE * p + (1 - DEGREE) * p_orig)
                sched.set_timesteps(steps)
                z = torch.randn((1, 4, res // 8, res // 8), generator=torch.manual_seed(seed)).to(device)
                z, e = z * sched.init_noise_sigma, e_src + gamma * (e_tgt - e_src)
                for t in sched.timesteps:
                    eu, ec = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, e])).sample.chunk(2)
                    z = sched.step(eu + CFG * (ec - eu), t, z, eta=0.0).prev_sample
            start = time.perf_counter()
            with torch.inference_mode():
                vae.decode(z / 0.18215)
            decode_s += time.perf_counter() - start
            latents.append(z.cpu())
            del unet
    return torch.cat(latents), decode_s


def run_reference(args, device):
    """Child: build orig + learned UNets, then time the reference's 12-image sweep."""
    import torch
    from tiny_models import tiny_vae

    orig = diffusers_unet(args.size).to(device)
    learned = copy.deepcopy(orig)
    learned_params = dict(learned.named_parameters())
    with torch.no_grad():
        for name, d in deltas(orig):
            learned_params[name].add_(d.to(device))
    e_src, e_tgt, uncond = (e.to(device) for e in embeddings(SIZES[args.size][1]))
    vae = tiny_vae()
    reset_peak(device)
    start = time.perf_counter()
    latents, decode_s = reference_images(learned, orig, vae, e_src, e_tgt, uncond, args.resolution, args.steps, device)
    sync(device)
    params = sum(p.numel() for p in orig.parameters())
    return {"seconds": time.perf_counter() - start, "decode_seconds": decode_s, "unet_params_m": params / 1e6}, latents


def run_ours(args, device):
    """Child: build the ComfyUI MODEL and a ForgeditResult, then time Forgedit Forget + Forgedit Sampler."""
    import torch
    from conftest import _PACK as pack, run_node
    from tiny_models import tiny_vae

    unet_d = diffusers_unet(args.size)
    model, to_ldm = comfy_model(args.size, unet_d)
    learned = {to_ldm[name]: d for name, d in deltas(unet_d)}
    del unet_d
    e_src, e_tgt, uncond = embeddings(SIZES[args.size][1])
    vae = tiny_vae()
    with torch.inference_mode():
        fp = pack.nodes.common.unet_fingerprint(pack.nodes.common.loaded_unet(model))
    meta = {"base_fingerprint": fp, "width": args.resolution, "height": args.resolution}
    result = pack.forgedit_ops.result.ForgeditResult(learned, e_src, uncond, meta)
    reset_peak(device)
    start = time.perf_counter()
    edited, = run_node("ForgeditForget", model=model, result=result, strategy=STRATEGY, degree=DEGREE)
    latent, _, _ = run_node("ForgeditSampler", model=edited, result=result, target=[[e_tgt, {}]], vae=vae, mode="vs",
                            gammas=", ".join(map(str, GAMMAS)), alphas="0.7", seeds=", ".join(map(str, SEEDS)),
                            steps=args.steps, cfg=CFG, sampler_name="ddim", scheduler="forgedit_reference",
                            batch_size=args.batch_size)
    sync(device)
    seconds, start = time.perf_counter() - start, time.perf_counter()
    with torch.inference_mode():
        vae.decode(latent["samples"])
    sync(device)
    return {"seconds": seconds, "decode_seconds": time.perf_counter() - start}, latent["samples"] * 0.18215


def child(args) -> None:
    """Run one side in this process and print its measurements as one JSON line."""
    import conftest  # noqa: F401  imports ComfyUI and loads the pack, as the tests do
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report, latents = (run_reference if args.role == "reference" else run_ours)(args, device)
    peak, name = peak_mb(device), device_name(device)
    torch.save(latents.float().cpu(), args.latents)
    print(json.dumps({**{k: round(v, 3) for k, v in report.items()}, "peak_mb": round(peak, 1), "device": name}))


def spawn(role: str, args, latents: Path) -> dict:
    """Run one side in a fresh subprocess and read its JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--latents", str(latents),
           "--size", args.size, "--resolution", str(args.resolution), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the {role} run failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(args) -> dict:
    """Run both sides and assemble the report."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        sides = {role: spawn(role, args, Path(tmp) / f"{role}.pt") for role in ("reference", "ours")}
        ref, ours = (torch.load(Path(tmp) / f"{r}.pt") for r in ("reference", "ours"))
    device, params = sides["ours"].pop("device"), sides["reference"].pop("unet_params_m")
    sides["reference"].pop("device")
    return {"device": device, "size": args.size, "unet_params_m": params, "resolution": args.resolution,
            "steps": args.steps, "batch_size": args.batch_size, "images": len(GAMMAS) * len(SEEDS), **sides,
            "speedup": round(sides["reference"]["seconds"] / sides["ours"]["seconds"], 2),
            "memory_ratio": round(sides["ours"]["peak_mb"] / sides["reference"]["peak_mb"], 3),
            "latent_rel_diff": float((ours - ref).abs().max() / ref.abs().max()),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "note": NOTE}


def table(r: dict) -> str:
    """A short human-readable summary of the report."""
    lines = [f"Forgedit edit sweep: {r['images']} images ({len(GAMMAS)} gammas x {len(SEEDS)} seeds), {r['size']} UNet "
             f"({r['unet_params_m']}M params), {r['resolution']}px, {r['steps']} steps, batch {r['batch_size']}, "
             f"{r['device']}", f"{'':10} {'seconds':>9} {'decode s':>9} {'peak MB':>9}"]
    lines += [f"{side:10} {r[side]['seconds']:9.2f} {r[side]['decode_seconds']:9.2f} {r[side]['peak_mb']:9.0f}"
              for side in ("reference", "ours")]
    lines.append(f"speedup {r['speedup']}x, memory ratio {r['memory_ratio']}, "
                 f"latent rel diff {r['latent_rel_diff']:.1e}, load average {r['load_avg']}")
    return "\n".join(lines + ["note: " + r["note"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--resolution", type=int, default=256, help="square image side in pixels (multiple of 64)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=12, help="images per sampling run on our side")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--role", choices=["reference", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--latents", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resolution % 64:
        parser.error("--resolution must be a multiple of 64")
    if args.role:
        return child(args)
    report = compare(args)
    print(json.dumps(report) if args.json else table(report))


if __name__ == "__main__":
    main()
