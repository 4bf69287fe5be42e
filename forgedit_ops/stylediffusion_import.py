"""The official StyleDiffusion checkpoints (`torch.save` of the trainer's list of per-step `nn.ModuleDict`s) as state
dicts of MappingNet: read with torch's weights-only unpickler and an allow-list of the five module classes they hold,
so a pickle naming anything else is refused before it runs."""
import os
import re

import torch
from torch import nn

LAYOUT = {"conv_start.weight": (154, 197, 1), "conv_start.bias": (154,), "conv_block.0.0.weight": (154, 154, 1),
          "conv_block.0.0.bias": (154,), "conv_block.0.1.weight": (154,), "conv_block.0.1.bias": (154,),
          "conv_end.weight": (154, 154, 1), "conv_end.bias": (154,)}
BLOCK = [nn.Conv1d, nn.BatchNorm1d, nn.LeakyReLU]
ALLOWED = [nn.ModuleDict, nn.Sequential, *BLOCK]
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def read_official_mappings(path: str) -> list[dict[str, torch.Tensor]]:
    """One MappingNet state dict per DDIM step (fp32, CPU) from an official .pth; BatchNorm running statistics dropped
    (the official code never leaves training mode, so they are never used)."""
    name = os.path.basename(path)
    try:
        with torch.serialization.safe_globals(ALLOWED):
            nets = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # the weights-only unpickler's refusal, or a file that is no torch.save pickle at all
        raise ValueError(f"{name} is not an official StyleDiffusion checkpoint ({refusal(e)}); nothing in it was run. "
                         "The official .pth holds only the mapping networks' torch modules") from None
    if not isinstance(nets, list) or not nets:
        found = "an empty list" if isinstance(nets, list) else f"an object of type {type(nets).__name__}"
        raise ValueError(f"{name} is not an official StyleDiffusion checkpoint: it holds {found}, not the list of "
                         "per-step mapping networks (nn.ModuleDict) that the official training saves")
    return [mapping_state(net, i, name) for i, net in enumerate(nets)]


def refusal(e: Exception) -> str:
    """What torch's weights-only unpickler refused (e.g. `Unsupported global: GLOBAL os.system`), or the error."""
    found = re.search(r"unsupported (?:global: )?GLOBAL [\w.]+", str(e), re.I)
    return found[0] if found else f"{type(e).__name__}: {e}"


def mapping_state(net, i: int, name: str) -> dict[str, torch.Tensor]:
    """The state dict of one official mapping network, checked against the official layout (197 → 154 rows)."""
    if is_official(net):
        state = {k: v.detach().float().clone() for k, v in net.state_dict().items()
                 if k.rsplit(".", 1)[-1] not in RUNNING_STATS}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if found == LAYOUT:
            return state
    else:
        found = " ".join(str(net).split())[:300]
    raise ValueError(f"{name}: entry {i} is not an official StyleDiffusion mapping network (a ModuleDict of conv_start "
                     "Conv1d(197, 154, 1), conv_block [Conv1d(154, 154, 1), BatchNorm1d(154), LeakyReLU], conv_end "
                     f"Conv1d(154, 154, 1)); found {found}")


def is_official(net) -> bool:
    """The official module layout: a ModuleDict of two Conv1d and one conv block, LeakyReLU slope and BN ε the defaults."""
    if not isinstance(net, nn.ModuleDict) or sorted(net.keys()) != ["conv_block", "conv_end", "conv_start"]:
        return False
    block = net["conv_block"]
    inner = block[0] if isinstance(block, nn.Sequential) and len(block) == 1 else None
    if not isinstance(inner, nn.Sequential) or [type(m) for m in inner] != BLOCK:
        return False
    _, norm, relu = inner
    convs = all(type(net[k]) is nn.Conv1d for k in ("conv_start", "conv_end"))
    return convs and norm.eps == 1e-5 and relu.negative_slope == 0.01
