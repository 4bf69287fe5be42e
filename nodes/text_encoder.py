"""The CLIP text encoder as DreamBooth-Forgedit trains it (Forgedit §7): a differentiable copy of the CLIP's encoder."""
import contextlib
import functools
import inspect

import comfy.clip_model
import torch

from ..forgedit_ops.finetune import deltas_in_place, trainable_copy
from .host import RUNTIME_HANDLES, materialized

LAYER_ARGUMENTS = ("x", "mask", "optimized_attention")


def in_text_model(key: str) -> bool:
    """Forgedit §7 trains all of transformers' CLIPTextModel, which has no pooled projection or logit scale."""
    return not key.endswith(("text_projection.weight", "logit_scale"))


def _residual_forward(layer, signature, *args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    x, mask, optimized_attention = (bound.arguments[name] for name in LAYER_ARGUMENTS)
    x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
    return x + layer.mlp(layer.layer_norm2(x))


def differentiable(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """ComfyUI's CLIP layers add their residuals in place, which autograd rejects: on this training copy they add out
    of place (the same arithmetic), whatever order ComfyUI passes the layer's arguments in."""
    signature = inspect.signature(comfy.clip_model.CLIPLayer.forward)
    extra = [p for p in list(signature.parameters)[1:] if p not in LAYER_ARGUMENTS
             and signature.parameters[p].default is inspect.Parameter.empty]
    if not all(p in signature.parameters for p in LAYER_ARGUMENTS) or extra:
        raise RuntimeError(f"DreamBooth-Forgedit does not know this ComfyUI's CLIP layer (forward{signature}); "
                           "update the pack")
    layer_signature = signature.replace(parameters=list(signature.parameters.values())[1:])
    for layer in text_encoder.modules():
        if isinstance(layer, comfy.clip_model.CLIPLayer):
            layer.forward = functools.partial(_residual_forward, layer, layer_signature)
    return text_encoder


@contextlib.contextmanager
def trainable_text_encoder(clip, device):
    """A differentiable fp32 copy of the CLIP's text encoder (with its patches) on `device`, its trained parameters and
    a function returning their deltas (in place: call it last). The CLIP is never modified."""
    patcher = materialized(clip.patcher)
    encoder, params = trainable_copy(patcher.model, in_text_model, device, drop=RUNTIME_HANDLES)
    encoder.set_clip_options({"execution_device": device})
    try:
        yield differentiable(encoder), params, lambda: deltas_in_place(params, patcher.model)
    finally:
        params.clear()
