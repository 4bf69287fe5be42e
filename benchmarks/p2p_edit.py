"""P2P / P2Plus edit benchmark: seconds per DDIM step and peak memory of the reference controller and of this pack's
editor, on the same random SD1.5-layout UNet and ViT-B/16-shaped image encoder, from a StyleDiffusion inversion with
every window open (τ_v = τ_c = τ_s = τ_u = 1: the most work per step), word swap + reweight + LocalBlend.

    python benchmarks/p2p_edit.py --layout {shallow,full} [--size 256] [--iterations 3] [--warmup 1] [--device ...]

- reference: the official controller as design note §1.2, §3 and §6 describe it (its code is not used): two UNet
  calls per step (uncond pair, then cond pair), an explicit fp32 softmax in all 32 attention layers, the image
  encoder and the mapping network re-run for each mapped item in every cross-attention call of the cond pair, the
  maps edited in place, every map of ≤ 32² queries of the cond call summed into the attention store.
- ours: the Forgedit P2P / P2Plus Edit node's loop (nodes.p2p_setup.edit_eps, forgedit_ops.p2p_edit.p2p_sample):
  one call of four rows, SDPA everywhere except the edited or stored cross maps, E(x) and M_i(E) once per step.

Each row runs in its own process; a 30-step edit costs 30 steps. Pin CPU runs: `taskset -c 1 env OMP_NUM_THREADS=1`.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from common import sync
from stylediffusion import BLOCKS, GUIDANCE, clock, machine, memory_mb, setup, stamp

MAP_LAYERS = (("input", 7, 0), ("input", 8, 0), ("output", 3, 0), ("output", 4, 0), ("output", 5, 0))


def edit_inputs(s, device):
    """The inversion-side inputs both rows share: x_T, [c_src, c_tgt], u, the word swap, equalizer, blend words."""
    g = torch.Generator().manual_seed(5)
    context = torch.cat([s.context, s.context + 0.1 * torch.randn(s.context.shape, generator=g)]).to(device)
    equalizer = torch.ones(77)
    equalizer[2] = 2.0
    words = torch.zeros(2, 77)
    words[:, 2] = 1
    return s.z.to(device), context, s.uncond.to(device), torch.eye(77), equalizer, words


def steps(args) -> int:
    """The timed edit's DDIM steps (the cost of a step does not depend on T)."""
    return args.warmup + args.iterations


def reference(args, device, s) -> list[tuple]:
    """The reference controller's steps on the loaded fp32 UNet; (wall, CPU) seconds per step."""
    ops, att = s.pack.forgedit_ops, s.pack.nodes.p2p_attention
    unet, vision = s.model.model.diffusion_model, s.clip_vision.model
    mapping = ops.stylediffusion.init_mapping(0).to(device)
    pixels = ops.image_features.reference_clip_preprocess(s.image).to(device, s.clip_vision.dtype)
    z, context, u, mapper, eq, words = edit_inputs(s, device)
    edit = ops.p2p_control.CrossEdit("replace", mapper, equalizer=eq)
    state = {"cond": False, "store": {}}

    def encode_and_map(n, ctx, value, extra):
        if not state["cond"]:
            return n, ctx, value
        rows = []
        for b in range(ctx.shape[0]):
            e = vision.vision_model.post_layernorm(vision(pixel_values=pixels, intermediate_output=None)[0]).float()
            rows.append(ops.stylediffusion.film(ctx[b:b + 1], *mapping(e)))
        return n, ctx, torch.cat(rows).to(ctx.dtype)

    def attention(q, k, v, extra):
        heads, layer = extra["n_heads"], (*extra["block"], extra.get("block_index", 0))
        scale = (q.shape[-1] // heads) ** -0.5
        probs = (att.split_heads(q, heads) @ att.split_heads(k, heads).transpose(-1, -2) * scale).softmax(-1)
        cross, queries = k.shape[1] == 77, probs.shape[-2]
        if cross and state["cond"]:
            probs = ops.p2p_control.edited_cross_maps(probs, edit)
        elif not cross and queries <= 32 ** 2:
            probs = probs[:1].expand_as(probs)
        if state["cond"] and queries <= 32 ** 2:
            key = (layer, cross)
            state["store"][key] = state["store"].get(key, 0) + probs
        return att.merge_heads(probs @ att.split_heads(v, heads))

    replace = {key: attention for key in BLOCKS}
    options = {"patches": {"attn2_patch": [encode_and_map]}, "patches_replace": {"attn1": replace, "attn2": dict(replace)}}
    blend = ops.p2p_edit.LocalBlend(words, 0.3, 0)
    zz, times = z.expand(2, -1, -1, -1).clone(), []
    with torch.no_grad():
        stride = 1000 // steps(args)
        for t in ops.ddim.inversion_timesteps(steps(args))[::-1]:
            start = clock()
            tt = torch.full((2,), t, device=device)
            state["cond"] = False
            eps_u = unet(zz, tt, u.expand(2, -1, -1), transformer_options=options)
            state["cond"] = True
            eps_c = unet(zz, tt, context, transformer_options=options)
            abar_prev = ops.ddim.abar_before(s.abar, t, stride)
            zz = ops.ddim.ddim_prev(ops.ddim.guided(eps_u, eps_c, GUIDANCE), zz, s.abar[t], abar_prev)
            maps = [state["store"][(key, True)] for key in MAP_LAYERS if (key, True) in state["store"]]
            if maps:
                zz = ops.p2p.blend(zz, ops.p2p.local_blend_mask(maps, words, blend.threshold, zz.shape[-2:]))
            sync(device)
            times.append(tuple(b - a for a, b in zip(start, clock())))
    return times


def ours(args, device, s) -> list[tuple]:
    """The editor node's loop: edit_eps (one call of four rows) and p2p_sample; (wall, CPU) seconds per step."""
    ops, nodes = s.pack.forgedit_ops, s.pack.nodes
    z, context, u, mapper, eq, words = edit_inputs(s, device)
    features = nodes.image_encoder.image_features(s.clip_vision, s.image)
    n = steps(args)
    mapping = [dict(ops.stylediffusion.init_mapping(0).state_dict())] * n
    inversion = ops.p2p_inversion.P2PInversion("stylediffusion", z.cpu(), context[:1].cpu(), u.cpu(),
                                               {"steps": n}, image_features=features, mapping=mapping)
    plan = nodes.p2p_setup.EditPlan(context.cpu(), ops.p2p_control.CrossEdit("replace", mapper, equalizer=eq), n,
                                    32 ** 2, nodes.p2p_setup.mapped_values(inversion),
                                    ops.p2p_edit.LocalBlend(words, 0.3, 0), False)
    eps, abar, _ = nodes.p2p_setup.edit_eps(s.model, inversion, "together", None, 1)
    stamps = [clock()]
    with torch.no_grad():
        ops.p2p_edit.p2p_sample(eps.call, z, context, eps.uncond, abar, n, GUIDANCE, plan.step_state(1, 1, 1, 1),
                                plan.local_blend, lambda i: (sync(device), stamps.append(clock())))
    return [tuple(y - x for x, y in zip(a, b)) for a, b in zip(stamps, stamps[1:])]


def measure(args) -> dict:
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    import conftest  # noqa: F401  imports ComfyUI as a library and loads this pack, as the tests do

    s = setup(args, device, torch.float32)
    times = (reference if args.role == "reference" else ours)(args, device, s)[args.warmup:]
    peak = memory_mb(device, peak=True)
    out = {"seconds_per_step": round(sum(w for w, _ in times) / len(times), 3), "peak_mb": round(peak),
           "delta_mb": round(peak - s.base_mb), "params_m": round(s.params / 1e6, 1), "machine": machine(device),
           "torch": torch.__version__}
    if device.type == "cpu":
        out["cpu_seconds_per_step"] = round(sum(c for _, c in times) / len(times), 3)
    return out


def row(role: str) -> dict:
    """One row in its own process."""
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--role", role], capture_output=True, text=True)
    if out.returncode == 0:
        return json.loads(out.stdout.strip().splitlines()[-1])
    return {"error": f"exit {out.returncode}: {(out.stderr.strip().splitlines() or [''])[-1]}"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", choices=("shallow", "full"), default="shallow")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (a multiple of 8)")
    p.add_argument("--iterations", type=int, default=3, help="timed DDIM steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--role", choices=("reference", "ours"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        print(json.dumps(measure(args)))
        return
    rows = {"reference (fp32)": row("reference"), "ours (fp32)": row("ours")}
    info = next((r for r in rows.values() if "error" not in r), {})
    print(f"P2P / P2Plus edit, {args.layout} SD1.5 layout ({info.get('params_m')} M params) @ {args.size}², "
          f"{args.warmup} warm-up + {args.iterations} timed step(s); " + stamp(info)
          + " · load average %.1f %.1f %.1f" % os.getloadavg())
    for name, r in rows.items():
        print(f"  {name:18s} " + (r["error"] if "error" in r else
              f"{r['seconds_per_step']:8.2f} s/step" + (f" ({r['cpu_seconds_per_step']:.2f} CPU s)"
              if "cpu_seconds_per_step" in r else "") + f", peak {r['peak_mb']} MB, Δ {r['delta_mb']} MB"))
    ref, ours_ = rows["reference (fp32)"], rows["ours (fp32)"]
    if "error" not in ref and "error" not in ours_:
        print(f"  ours / reference: time {ours_['seconds_per_step'] / ref['seconds_per_step']:.2f} "
              f"({ref['seconds_per_step'] / ours_['seconds_per_step']:.1f}x faster), "
              f"peak {ours_['peak_mb'] / ref['peak_mb']:.2f}, Δ {ours_['delta_mb'] / max(ref['delta_mb'], 1):.2f}")


if __name__ == "__main__":
    main()
