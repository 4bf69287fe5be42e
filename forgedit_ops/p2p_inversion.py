"""The inversion an attention-control edit starts from (P2P_INVERSION), of three kinds: plain DDIM inversion, null-text
inversion (Mokady et al. 2023) and StyleDiffusion (Li et al. 2023); its file, and the official StyleDiffusion
checkpoints."""
import json
import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch
from safetensors.torch import load_file

from .storage import (DTYPES, INVERSION_MARKER as MARKER, MARKER as RESULT_MARKER, header_metadata, metadata_header,
                      read_header, write)

KINDS = ("ddim", "nulltext", "stylediffusion")
FORMAT = "1"


@dataclass
class P2PInversion:
    """x_T (1, 4, h, w) in model space at the first edit timestep, the source prompt's embedding c and the empty
    prompt's u (1, 77, C); per kind: the optimised null texts ∅_i (T, 77, C), or E(x) (1, 197, C) and the T mapping
    networks (state dicts with the official names, `mapping[i]`); the latent its guided reconstruction ends at;
    metadata (kind, base fingerprint, settings, losses).
    `accept_any_base` (an Inversion Load choice) and `token` belong to this session and are never saved."""
    kind: str
    x_T: torch.Tensor
    source_embedding: torch.Tensor
    uncond_embedding: torch.Tensor
    metadata: dict = field(default_factory=dict)
    null_embeddings: Optional[torch.Tensor] = None
    image_features: Optional[torch.Tensor] = None
    mapping: list = field(default_factory=list)
    reconstruction: Optional[torch.Tensor] = None
    accept_any_base: bool = False
    token: str = field(default_factory=lambda: uuid.uuid4().hex, init=False, compare=False, repr=False)

    def __post_init__(self):
        """The metadata as its file holds it (JSON values: tuples become lists), so a saved inversion loads equal."""
        self.metadata = json.loads(json.dumps(self.metadata))

    def _comfy_cache_tensors(self) -> list[torch.Tensor]:
        """Every tensor held, so ComfyUI's RAM-pressure cache sizes this inversion by what it really holds."""
        optional = [t for t in (self.null_embeddings, self.image_features, self.reconstruction) if t is not None]
        return [self.x_T, self.source_embedding, self.uncond_embedding, *optional,
                *(t for sd in self.mapping for t in sd.values())]


def inversion_tensors(inv: P2PInversion, dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """The file's tensors: the mapping networks as `mapping.<i>.<official name>` in `dtype`, everything else fp32."""
    tensors = {"x_T": inv.x_T, "source_embedding": inv.source_embedding, "uncond_embedding": inv.uncond_embedding}
    for name in ("null_embeddings", "image_features", "reconstruction"):
        if getattr(inv, name) is not None:
            tensors[name] = getattr(inv, name)
    tensors = {k: t.float() for k, t in tensors.items()}
    return tensors | {f"mapping.{i}.{k}": t.to(DTYPES[dtype]) for i, sd in enumerate(inv.mapping) for k, t in sd.items()}


def save_inversion(inv: P2PInversion, path: str, dtype: str = "fp32", version: str = "") -> None:
    """One safetensors file per inversion; its header marker differs from a Forgedit result's."""
    header = metadata_header({"kind": inv.kind, **inv.metadata}, p2p_inversion=FORMAT, version=version,
                             mapping_dtype=dtype)
    write(inversion_tensors(inv, dtype), path, header)


def load_inversion(path: str) -> P2PInversion:
    """Read an Inversion Save file back (fp32, CPU); a Forgedit result or any other file is refused by name."""
    header = read_header(path)
    if RESULT_MARKER in header:
        raise ValueError(f"{path} is a Forgedit fine-tune result: load it with Forgedit Load; Forgedit Inversion Load "
                         "reads the files of Forgedit Inversion Save")
    if MARKER not in header:
        raise ValueError(f"{path} is not a Forgedit inversion: its header has no '{MARKER}' entry (an official "
                         "StyleDiffusion .pth? import it with Forgedit StyleDiffusion Import)")
    if header[MARKER] != FORMAT:
        raise ValueError(f"{path} is inversion format {header[MARKER]}, this pack reads format {FORMAT}: update the pack")
    tensors = {k: t.float() for k, t in load_file(path).items()}
    metadata = header_metadata(header)
    return P2PInversion(metadata.pop("kind"), tensors["x_T"], tensors["source_embedding"], tensors["uncond_embedding"],
                        metadata, tensors.get("null_embeddings"), tensors.get("image_features"),
                        split_mapping(tensors), tensors.get("reconstruction"))


def split_mapping(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """`mapping.<i>.<name>` tensors as one state dict per step, in step order."""
    steps: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("mapping."):
            i, name = key.removeprefix("mapping.").split(".", 1)
            steps.setdefault(int(i), {})[name] = t
    return [steps[i] for i in sorted(steps)]
