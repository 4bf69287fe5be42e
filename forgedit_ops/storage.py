"""Files of a fine-tuned result: one safetensors file per result, a core "diff" LoRA of the UNet delta, cache keys.

Result file: tensors `delta.<UNet key>` and, for DreamBooth-Forgedit, `text_delta.<CLIP key>` (fp16 or fp32),
`source_embedding` and `uncond_embedding` (fp32, (1, 77, C));
header: "forgedit.format" (the marker), "forgedit.version", "forgedit.deltas_dtype" and every metadata entry as JSON.
"""
import hashlib
import json
import os
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .forgetting import forgetting_patches
from .result import ForgeditResult

FORMAT = "1"
MARKER = "forgedit.format"
LORA_MARKER = "forgedit.lora"
INVERSION_MARKER = "forgedit.p2p_inversion"  # forgedit_ops.p2p_inversion's files
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def metadata_header(metadata: dict, **markers: str) -> dict[str, str]:
    """Safetensors header strings: `forgedit.*` markers as given, metadata values JSON-encoded."""
    return {**{f"forgedit.{k}": v for k, v in markers.items()}, **{k: json.dumps(v) for k, v in metadata.items()}}


def write(tensors: dict[str, torch.Tensor], path: str, header: dict[str, str]) -> None:
    """Write a safetensors file through a temporary name, so an interrupted save never leaves a truncated file."""
    save_file({k: t.contiguous() for k, t in tensors.items()}, path + ".part", header)
    os.replace(path + ".part", path)


def save_result(result: ForgeditResult, path: str, dtype: str = "fp16", version: str = "") -> None:
    """One file per result: deltas in `dtype` (fp16 halves the size), embeddings always fp32, metadata in the header."""
    tensors = {"delta." + k: d.to(DTYPES[dtype]) for k, d in result.deltas.items()}
    tensors |= {"text_delta." + k: d.to(DTYPES[dtype]) for k, d in result.text_deltas.items()}
    tensors |= {"source_embedding": result.source_embedding.float(), "uncond_embedding": result.uncond_embedding.float()}
    write(tensors, path, metadata_header(result.metadata, format=FORMAT, version=version, deltas_dtype=dtype))


def header_metadata(header: dict[str, str]) -> dict:
    """The metadata entries of a header written by metadata_header, decoded (the `forgedit.*` markers left out)."""
    return {k: json.loads(v) for k, v in header.items() if not k.startswith("forgedit.")}


def read_header(path: str) -> dict[str, str]:
    """The header of a safetensors file; a truncated or foreign file gives a ValueError that names it."""
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        with open(path, "rb") as f:
            truncated = f.read(9)[8:] == b"{"
        what = "is truncated (an interrupted save or copy?)" if truncated else "is not a safetensors file"
        raise ValueError(f"{path} {what} ({e})") from None


def load_result(path: str) -> ForgeditResult:
    """Read a Forgedit Save file back into a result: fp32 CPU deltas and embeddings, metadata from the header."""
    header = read_header(path)
    if LORA_MARKER in header:
        raise ValueError(f"{path} is a Forgedit LoRA export (the UNet delta only): apply it with LoraLoaderModelOnly; "
                         "Forgedit Load reads the files of Forgedit Save")
    if INVERSION_MARKER in header:
        raise ValueError(f"{path} is a Forgedit inversion (P2P_INVERSION): load it with Forgedit Inversion Load; "
                         "Forgedit Load reads the files of Forgedit Save")
    if MARKER not in header:
        raise ValueError(f"{path} is not a Forgedit result: its header has no '{MARKER}' entry (a LoRA, checkpoint or "
                         "other model file?). Forgedit Load reads the files of Forgedit Save.")
    if header[MARKER] != FORMAT:
        raise ValueError(f"{path} is Forgedit format {header[MARKER]}, this pack reads format {FORMAT}: update the pack")
    tensors = load_file(path)
    deltas, text_deltas = ({k.removeprefix(prefix): t.float() for k, t in tensors.items() if k.startswith(prefix)}
                           for prefix in ("delta.", "text_delta."))
    return ForgeditResult(deltas, tensors["source_embedding"], tensors["uncond_embedding"], header_metadata(header),
                          text_deltas)


def lora_key(key: str) -> str:
    """ComfyUI's "diff" LoRA name of a UNet tensor: `<module>.diff` for weights, `<module>.diff_b` for biases."""
    module, name = key.rsplit(".", 1)
    if name == "weight":
        return f"diffusion_model.{module}.diff"
    if name == "bias":
        return f"diffusion_model.{module}.diff_b"
    return f"diffusion_model.{key}.diff"


def lora_state_dict(deltas: dict[str, torch.Tensor], rule: Callable[[str], bool], degree: float,
                    dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """The learned weights as a core "diff" LoRA with forgetting baked in: kept tensors Δ, forgotten ones degree·Δ."""
    return {lora_key(k): (strength * d).to(DTYPES[dtype])
            for group, strength in forgetting_patches(deltas, rule, degree) for k, d in group.items()}


def cache_key(values: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (32 hex digits) of JSON values and the exact bytes of tensors: the disk-cache name of a fine-tune."""
    h = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode())
    for name, t in sorted(tensors.items()):
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]
