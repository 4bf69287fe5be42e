"""The ComfyUI side of attention control (StyleDiffusion §3, Prompt-to-Prompt §3): the mapped value input through
`attn2_patch` (keys stay the text), explicit fp32 attention maps through `patches_replace["attn2"]` only in the layers
whose maps are read, SDPA everywhere else, and the per-call state carried in transformer_options."""
import torch

import comfy.ldm.modules.attention as attention

from ..forgedit_ops.stylediffusion import film

# The 16² cross-attention layers of SD1.x at 512² (input blocks 7, 8, output blocks 3, 4, 5): the maps StyleDiffusion's
# attention loss regularises and LocalBlend reads, chosen by block at every image size.
MAP_LAYERS = (("input", 7, 0), ("input", 8, 0), ("output", 3, 0), ("output", 4, 0), ("output", 5, 0))
FILM = "forgedit_film"      # (γ, β): the cond rows' values become c⊙γ + β
RECORD = "forgedit_record"  # a list: the cond rows' maps of MAP_LAYERS are appended to it, in call order
COND, UNCOND = 0, 1


def cond_rows(extra_options: dict, batch: int) -> slice | list:
    """The rows of the cond chunk(s) in a UNet call (cond_or_uncond: one entry per chunk, 0 = cond)."""
    chunks = extra_options.get("cond_or_uncond", [COND])
    size = batch // len(chunks)
    return [r for c, kind in enumerate(chunks) if kind == COND for r in range(c * size, (c + 1) * size)]


def value_patch(n, context, value, extra_options):
    """attn2_patch: the mapped value input c⊙γ + β in the cond rows when the call carries γ, β (StyleDiffusion §3.1)."""
    state = extra_options.get(FILM)
    if state is None:
        return n, context, value
    rows = cond_rows(extra_options, context.shape[0])
    mapped = value.clone()
    mapped[rows] = film(value[rows], *state).to(value.dtype)
    return n, context, mapped


def explicit_attention(q, k, v, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q·kᵀ/√d)·v with the probabilities in fp32, as the reference computes them: (out, probs (B, h, N, 77))."""
    b, n, inner = q.shape
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, inner // heads).transpose(1, 2)
    with torch.autocast(q.device.type, enabled=False):
        probs = (split(q).float() @ split(k).float().transpose(-1, -2) * (inner // heads) ** -0.5).softmax(-1)
        out = probs.to(v.dtype) @ split(v)
    return out.transpose(1, 2).reshape(b, n, inner), probs


def recording_attention(q, k, v, extra_options):
    """patches_replace attn2 of MAP_LAYERS: explicit maps when the call records them, SDPA otherwise."""
    record = extra_options.get(RECORD)
    if record is None:
        return attention.attention_pytorch(q, k, v, extra_options["n_heads"])
    out, probs = explicit_attention(q, k, v, extra_options["n_heads"])
    record.append(probs[cond_rows(extra_options, q.shape[0])])
    return out


def require_free_layers(model_options: dict) -> None:
    """Replace patches are exclusive per block: one the MODEL already has on a map layer cannot be composed with ours."""
    taken = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    clash = [key for key in MAP_LAYERS if key in taken or key[:2] in taken]
    if clash:
        names = ", ".join(f"{b} {i}" for b, i, _ in clash)
        raise ValueError(f"this MODEL already replaces the cross-attention of {names} (an IPAdapter, attention couple or "
                         "similar patch): attention control needs those layers. Connect the MODEL before that patch.")


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
