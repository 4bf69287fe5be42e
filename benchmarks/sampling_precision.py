"""Why the edit sweep samples in the model's own precision: how far bf16 autocast moves a Forgedit edit, against how far
the learned deltas move it (Forgedit spec §10: bf16 rounding destroys small deltas).

    python benchmarks/sampling_precision.py --size shallow --resolution 256 --steps 10 --delta 1e-4 [--json]

On random weights of the chosen size, base + delta·randn on the trained set stands in for a fine-tune. One CFG DDIM
run (batch 2, as the reference) in fp32 with and without the deltas gives the deltas' effect on the final latent; the
same run under bf16 autocast gives the precision error. Reports both norms, their ratio and the seconds of each run.
"""
import argparse
import copy
import json
import time

import torch
from common import SIZES, device_name, diffusers_unet, reference_trained, sync


def with_deltas(unet, scale: float):
    learned = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in learned.named_parameters():
            if reference_trained(name):
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.device))
    return learned


def ddim_edit(unet, e, uncond, res: int, steps: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, float]:
    """The reference's edit: CFG 7.5 DDIM (leading timesteps, eta 0) from seed 0; (final latent, seconds)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    sched.set_timesteps(steps)
    z = torch.randn((1, 4, res // 8, res // 8), generator=torch.manual_seed(0)).to(device)
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for t in sched.timesteps:
            eu, ec = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, e])).sample.float().chunk(2)
            z = sched.step(eu + 7.5 * (ec - eu), t, z, eta=0.0).prev_sample
    sync(device)
    return z, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--delta", type=float, default=1e-4, help="scale of the random deltas (Forgedit's are 1e-4..2e-3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = diffusers_unet(args.size).to(device)
    learned = with_deltas(base, args.delta)
    e, uncond = torch.randn(2, 1, 77, SIZES[args.size][1], generator=torch.Generator().manual_seed(2)).to(device).unbind(0)
    edit = lambda unet, dtype: ddim_edit(unet, e, uncond, args.resolution, args.steps, dtype, device)
    z_base, _ = edit(base, torch.float32)
    z32, s32 = edit(learned, torch.float32)
    zbf16, sbf16 = edit(learned, torch.bfloat16)
    effect, error = float((z32 - z_base).norm()), float((zbf16 - z32).norm())
    report = {"device": device_name(device), "size": args.size, "resolution": args.resolution, "steps": args.steps,
              "delta": args.delta, "delta_effect_norm": effect, "bf16_error_norm": error,
              "error_over_effect": round(error / effect, 3), "fp32_seconds": round(s32, 2), "bf16_seconds": round(sbf16, 2)}
    print(json.dumps(report) if args.json else
          f"{args.size} @ {args.resolution}px, {args.steps} steps, deltas {args.delta:g}: bf16 moves the edit "
          f"{report['error_over_effect']}x as far as the deltas do; fp32 {s32:.1f} s, bf16 {sbf16:.1f} s")


if __name__ == "__main__":
    main()
