"""The CLIP text encoder as DreamBooth-Forgedit trains it (Forgedit §7): a differentiable copy of the CLIP's encoder."""
import contextlib
import functools
import inspect
import re

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


def read_layer(encoder) -> int:
    """The last transformer layer whose output the text encoder's embedding reads (SD 2.x: the penultimate)."""
    tower = getattr(encoder, encoder.clip)
    if tower.layer != "hidden":
        return tower.num_layers - 1
    return tower.layer_idx % tower.num_layers


def freeze_unread_layers(encoder, params: dict) -> None:
    """Layers after the one read get no gradient: they stay frozen and out of the deltas (diffusers' SD 2.x text
    encoder drops its last layer outright)."""
    last = read_layer(encoder)
    for key in list(params):
        layer = re.search(r"\.layers\.(\d+)\.", key)
        if layer and int(layer[1]) > last:
            params.pop(key).requires_grad_(False)


@contextlib.contextmanager
def trainable_text_encoder(clip, device):
    """A differentiable fp32 copy of the CLIP's text encoder (with its patches) on `device` that reads the layer the
    CLIP encodes with (CLIPSetLastLayer; SD 2.x: the penultimate), its trained parameters and a function returning their
    deltas (in place: call it last). The CLIP is never modified."""
    patcher = materialized(clip.patcher)
    encoder, params = trainable_copy(patcher.model, in_text_model, device, drop=RUNTIME_HANDLES)
    encoder.reset_clip_options()
    if clip.layer_idx is not None:
        encoder.set_clip_options({"layer": clip.layer_idx})
    encoder.set_clip_options({"execution_device": device})
    freeze_unread_layers(encoder, params)
    try:
        yield differentiable(encoder), params, lambda: deltas_in_place(params, patcher.model)
    finally:
        params.clear()
