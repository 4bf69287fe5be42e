"""The ComfyUI side of attention control (StyleDiffusion §3, Prompt-to-Prompt §3): the mapped value input through
`attn2_patch` (keys stay the text), explicit fp32 attention maps through `patches_replace["attn2"]` only in the layers
whose maps are read, SDPA everywhere else, and the per-call state carried in transformer_options."""
import torch

import comfy.ldm.modules.attention as attention

from ..forgedit_ops.p2p_control import edited_cross_maps, injected
from ..forgedit_ops.stylediffusion import film

# The 16² cross-attention layers of SD1.x at 512² (input blocks 7, 8, output blocks 3, 4, 5): the maps StyleDiffusion's
# attention loss regularises and LocalBlend reads, chosen by block at every image size.
MAP_LAYERS = (("input", 7, 0), ("input", 8, 0), ("output", 3, 0), ("output", 4, 0), ("output", 5, 0))
FILM = "forgedit_film"      # (γ, β[, items]): the cond rows' values (of these items of each chunk) become c⊙γ + β
RECORD = "forgedit_record"  # a list: the cond rows' maps of MAP_LAYERS are appended to it, in call order
EDIT = "forgedit_edit"      # a forgedit_ops.p2p_control.EditStep: Prompt-to-Prompt / P2Plus at this step
COND, UNCOND = 0, 1


def chunks(extra_options: dict, batch: int) -> list[tuple[int, slice]]:
    """(cond or uncond, rows) of each chunk of a UNet call (cond_or_uncond: one entry per chunk, 0 = cond)."""
    kinds = extra_options.get("cond_or_uncond", [COND])
    size = batch // len(kinds)
    return [(kind, slice(c * size, (c + 1) * size)) for c, kind in enumerate(kinds)]


def cond_rows(extra_options: dict, batch: int, items=None) -> list[int]:
    """The rows of the cond chunk(s), or of these items of each cond chunk."""
    return [r for kind, rows in chunks(extra_options, batch) if kind == COND
            for i, r in enumerate(range(rows.start, rows.stop)) if items is None or i in items]


def value_patch(n, context, value, extra_options):
    """attn2_patch: the mapped value input c⊙γ + β in the cond rows when the call carries γ, β (StyleDiffusion §3.1)."""
    state = extra_options.get(FILM)
    if state is None:
        return n, context, value
    gamma, beta, *items = state
    rows = cond_rows(extra_options, context.shape[0], items[0] if items else None)
    mapped = value.clone()
    mapped[rows] = film(value[rows], gamma.to(value.device), beta.to(value.device)).to(value.dtype)
    return n, context, mapped


def explicit_attention(q, k, v, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q·kᵀ/√d)·v with the probabilities in fp32, as the reference computes them: (out, probs (B, h, N, 77))."""
    scale = (q.shape[-1] // heads) ** -0.5
    with torch.autocast(q.device.type, enabled=False):
        probs = (split_heads(q, heads).float() @ split_heads(k, heads).float().transpose(-1, -2) * scale).softmax(-1)
        out = probs.to(v.dtype) @ split_heads(v, heads)
    return merge_heads(out), probs


def recording_attention(q, k, v, extra_options):
    """patches_replace attn2 of MAP_LAYERS: explicit maps when the call records them, SDPA otherwise."""
    record = extra_options.get(RECORD)
    if record is None:
        return sdpa(q, k, v, extra_options)
    out, probs = explicit_attention(q, k, v, extra_options["n_heads"])
    record.append(probs[cond_rows(extra_options, q.shape[0])])
    return out


def require_free_layers(model_options: dict, layers=MAP_LAYERS, kinds=("attn2",)) -> None:
    """Replace patches are exclusive per block: one the MODEL already has on a layer we replace cannot be composed."""
    replaced = model_options.get("transformer_options", {}).get("patches_replace", {})
    names = {"attn1": "self-attention", "attn2": "cross-attention"}
    for kind in kinds:
        taken = replaced.get(kind, {})
        clash = [key for key in layers if key in taken or key[:2] in taken]
        if clash:
            where = ", ".join(f"{b} {i}" for b, i, _ in clash)
            raise ValueError(f"this MODEL already replaces the {names[kind]} of {where} (an IPAdapter, attention couple "
                             "or similar patch): attention control needs those layers. Connect the MODEL before that "
                             "patch.")


def control_options(base: dict) -> dict:
    """transformer_options with our value patch appended to the MODEL's attn2 patches and the map layers replaced."""
    options = dict(base)
    patches = {k: list(v) for k, v in base.get("patches", {}).items()}
    patches["attn2_patch"] = patches.get("attn2_patch", []) + [value_patch]
    replace = {k: dict(v) for k, v in base.get("patches_replace", {}).items()}
    replace["attn2"] = {**replace.get("attn2", {}), **{key: recording_attention for key in MAP_LAYERS}}
    return options | {"patches": patches, "patches_replace": replace}


def make_attend(eps, options: dict, precision: torch.dtype, device: torch.device):
    """attend(z, t, context, film, record) of forgedit_ops.stylediffusion over a UNet copy's eps(x, t, c, options):
    one cond call under autocast to `precision`, returning fp32 ε and the recorded maps."""
    options = control_options(options)
    autocast = torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32, cache_enabled=False)

    def attend(z, t, context, state=None, record=False):
        maps = [] if record else None
        call = options | {"cond_or_uncond": [COND], FILM: state, RECORD: maps}
        with autocast:
            e = eps(z, torch.full((z.shape[0],), t, device=device), context, call)
        return e.float(), maps or []

    return attend


def sdpa(q, k, v, extra_options):
    return attention.attention_pytorch(q, k, v, extra_options["n_heads"])


def editing_self_attention(q, k, v, extra_options):
    """patches_replace attn1 of every block: in the chunks the step injects, the targets attend with the source's
    queries and keys to their own values (P_src·V_tgt), for maps of at most `self_queries` queries; SDPA throughout."""
    step = extra_options.get(EDIT)
    if step is None or q.shape[1] > step.self_queries:
        return sdpa(q, k, v, extra_options)
    q, k = q.clone(), k.clone()
    for kind, rows in chunks(extra_options, q.shape[0]):
        if (step.self_cond if kind == COND else step.self_uncond) and rows.stop - rows.start > 1:
            q[rows], k[rows] = injected(q[rows], rows.stop - rows.start), injected(k[rows], rows.stop - rows.start)
    return sdpa(q, k, v, extra_options)


def editing_cross_attention(q, k, v, extra_options):
    """patches_replace attn2 of every block: inside τ_c the cond chunks' target maps are edited from the source's
    (explicit fp32 maps there only); the map layers add their cond maps, post-edit, to the LocalBlend store."""
    step = extra_options.get(EDIT)
    layer = (*extra_options["block"], extra_options.get("block_index", 0))
    storing = step is not None and step.store is not None and layer in MAP_LAYERS
    out = sdpa(q, k, v, extra_options)
    if step is None or (step.cross is None and not storing):
        return out
    heads, kept = extra_options["n_heads"], []
    for kind, rows in chunks(extra_options, q.shape[0]):
        if kind != COND:
            continue
        _, probs = explicit_attention(q[rows], k[rows], v[rows], heads)
        if step.cross is not None:
            probs = edited_cross_maps(probs, step.cross)
            targets = slice(rows.start + 1, rows.stop)
            out[targets] = merge_heads(probs[1:].to(v.dtype) @ split_heads(v[targets], heads))
        kept.append(probs)
    if storing and kept:
        step.store.append(torch.cat(kept))
    return out


def split_heads(x, heads: int):
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def merge_heads(x):
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


SD1_BLOCKS = [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)] + [("output", i, 0) for i in range(3, 12)]


def edit_options(base: dict) -> dict:
    """transformer_options for Prompt-to-Prompt / P2Plus: the value patch appended to the MODEL's attn2 patches, both
    attentions of every SD1.x transformer block replaced (the MODEL may replace none of them)."""
    options = control_options(base)
    replace = options["patches_replace"]
    replace["attn1"] = {**replace.get("attn1", {}), **{key: editing_self_attention for key in SD1_BLOCKS}}
    replace["attn2"] = {**replace["attn2"], **{key: editing_cross_attention for key in SD1_BLOCKS}}
    return options
