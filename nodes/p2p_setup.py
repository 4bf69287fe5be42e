"""What the P2P / P2Plus editor prepares: the prompts' tokens and the edit they imply, the per-step controller for one
τ combination, the values of StyleDiffusion's mapping networks, and the UNet call (batched or separate)."""
import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..forgedit_ops.p2p import (blend_begins, blend_weights, cross_steps, equalizer, parse_reweight, refinement_mapper,
                                replacement_mapper, self_steps, value_steps)
from ..forgedit_ops.p2p_control import CrossEdit, EditStep
from ..forgedit_ops.p2p_edit import LocalBlend
from ..forgedit_ops.schedule import alphas_cumprod
from ..forgedit_ops.stylediffusion import MappingNet
from .common import encode_prompt, unet_fingerprint
from .host import free_memory, materialized, sdpa_transformer_options
from .inversion_run import compute_dtype
from .training import progress
from .p2p_attention import EDIT, FILM, SD1_BLOCKS, edit_options, require_free_layers

ALIGNERS = ("reference", "fixed")
SELF_LEVELS = ("reference", "relative")
BATCH_MODES = ("auto", "together", "separate")
WEIGHT_SYNTAX = re.compile(r"\([^()]*:\s*-?[\d.]+\s*\)|embedding:")
# SD1.5's inference activations per latent pixel and batch row (about 1 GB per row at 512², SDPA): `auto` makes one
# call of four rows when four rows' worth is free, else two calls of two.
ROW_BYTES_PER_LATENT_PIXEL = 256 * 1024


def check_edit_text(target_prompt, edit_type, reweight, source_words, target_words) -> None:
    """Queue-time checks of the editor's text inputs (None: linked, checked when it runs)."""
    if target_prompt is not None and edit_type != "reconstruct" and not target_prompt.strip():
        raise ValueError("target_prompt is empty: write the source prompt with the words you want changed")
    if target_prompt is not None and WEIGHT_SYNTAX.search(target_prompt):
        raise ValueError("target_prompt uses weight syntax '(word:1.2)' or an embedding: attention control maps "
                         "tokens one to one; use reweight for emphasis")
    if reweight:
        parse_reweight(reweight)
    if source_words is not None and target_words is not None and bool(source_words.strip()) != bool(target_words.strip()):
        raise ValueError("LocalBlend needs words of both prompts: fill blend_source_words and blend_target_words, "
                         "or leave both empty")


def require_inversion_base(model, inversion) -> None:
    """An inversion edits only on the weights it was made with (same checkpoint, same LoRAs, same Forget patches)."""
    expected = inversion.metadata.get("base_fingerprint")
    found = unet_fingerprint(materialized(model).model.diffusion_model)
    if expected != found and not inversion.accept_any_base:
        raise ValueError(f"this inversion was made on another MODEL (fingerprint {expected}, this MODEL is {found}): "
                         "connect the MODEL the inversion node used (or turn on ignore_base_mismatch in Forgedit "
                         "Inversion Load)")


class Tokens:
    """ComfyUI's SD1 tokenizer (an HF CLIPTokenizer) as P2P's word functions read it."""

    def __init__(self, clip):
        tokenizer = getattr(clip.tokenizer, clip.tokenizer.clip).tokenizer
        self.encode = lambda text: tokenizer.encode(text)[1:-1]
        self.decode = lambda token: tokenizer.decode([token])
        self.full = tokenizer.encode


@dataclass
class EditPlan:
    """One edit, all τ combinations: the two prompts' embeddings, the cross edit, the mapped values per step."""
    context: torch.Tensor
    cross: Optional[CrossEdit]
    steps: int
    self_queries: int
    films: Optional[list]
    local_blend: Optional[LocalBlend]
    reconstruct: bool

    def step_state(self, tau_v: float, tau_c: float, tau_s: float, tau_u: float):
        """The controller of one τ combination: step i → (EditStep, film)."""
        crossing, values = cross_steps(tau_c, self.steps), value_steps(tau_v, self.steps)
        selfing, unconds = self_steps(tau_s, self.steps), self_steps(tau_u, self.steps)

        def state(i: int):
            film = None
            if self.films is not None:
                film = (*self.films[i], [0, 1] if self.reconstruct or i < values else [0])
            if self.reconstruct:
                return EditStep(self_queries=self.self_queries), film
            return EditStep(self.cross if i < crossing else None, i < selfing, i < unconds, self.self_queries), film

        return state


def edit_plan(clip, inversion, target_prompt, edit_type, reweight, aligner, source_words, target_words, threshold,
              start, levels) -> EditPlan:
    """The prompts, the word-level edit (mapper, equalizer, LocalBlend words) and the mapped values of the inversion."""
    check_edit_text(target_prompt, edit_type, reweight, source_words, target_words)
    source = " ".join(inversion.metadata["source_prompt"].split())
    target = source if edit_type == "reconstruct" else " ".join(target_prompt.split())
    tokens, steps = Tokens(clip), inversion.metadata["steps"]
    encoded = encode_prompt(clip, target, "target_prompt").cpu()
    if encoded.shape[-1] != inversion.source_embedding.shape[-1]:
        raise ValueError(f"target_prompt's embedding is {encoded.shape[-1]} wide, the inversion's "
                         f"{inversion.source_embedding.shape[-1]}: use the CLIP of the checkpoint it was inverted with")
    context = torch.cat([inversion.source_embedding, encoded])
    cross = None
    if edit_type == "replace":
        cross = CrossEdit("replace", replacement_mapper(source, target, tokens.encode, tokens.decode, aligner))
    elif edit_type == "refine":
        cross = CrossEdit("refine", *refinement_mapper(tokens.full(source), tokens.full(target)))
    if cross is not None and reweight:
        cross.equalizer = equalizer(target, parse_reweight(reweight), tokens.encode, tokens.decode)
    h, w = inversion.x_T.shape[-2:]
    reconstruct = edit_type == "reconstruct"
    local_blend = None if reconstruct else blend_words(source, target, source_words, target_words, tokens, threshold,
                                                       start, steps)
    return EditPlan(context, cross, steps, 32 ** 2 if levels == "reference" else h * w // 4, mapped_values(inversion),
                    local_blend, reconstruct)


def blend_words(source, target, source_words, target_words, tokens, threshold, start, steps) -> Optional[LocalBlend]:
    """LocalBlend's per-item word weights (2, 77): the source's blend words on item 0, the target's on item 1."""
    if not source_words.strip():
        return None
    weights = torch.stack([blend_weights(prompt, re.split(r"[,\s]+", words.strip()), tokens.encode, tokens.decode)
                           for prompt, words in ((source, source_words), (target, target_words))])
    return LocalBlend(weights, threshold, blend_begins(start, steps))


@torch.no_grad()
def mapped_values(inversion) -> Optional[list]:
    """StyleDiffusion's (γ_i, β_i) of every step from its mapping networks and E(x), computed once per edit."""
    if inversion.kind != "stylediffusion":
        return None
    net, values = MappingNet(inversion.image_features.shape[1]), []
    for state in inversion.mapping:
        net.load_state_dict(state)
        values.append(tuple(v.clone() for v in net(inversion.image_features.float())))
    return values


@dataclass
class EditEps:
    call: callable
    uncond: callable
    tick: callable


def edit_eps(model, inversion, batch_mode: str, node_id, edits: int):
    """The UNet call of the edit loop with Prompt-to-Prompt's patches, ᾱ and the device: rows [∅ src, ∅ tgt, c src,
    c tgt] in one call (cond_or_uncond [1, 0]), or the uncond then the cond pair."""
    require_free_layers(model.model_options, SD1_BLOCKS, ("attn1", "attn2"))
    patcher = materialized(model)
    unet, device = patcher.model.diffusion_model, patcher.load_device
    options, dtype = edit_options(sdpa_transformer_options(patcher)), compute_dtype(patcher)
    needed = 4 * ROW_BYTES_PER_LATENT_PIXEL * inversion.x_T[0, 0].numel()
    together = batch_mode == "together" or (batch_mode == "auto" and free_memory(patcher, device) > needed)

    def unet_call(x, t, c, step, film, kinds):
        to = options | {EDIT: step, FILM: film, "cond_or_uncond": kinds}
        return unet(x.to(dtype), torch.full((x.shape[0],), t, device=device), c.to(device, dtype),
                    transformer_options=to).float()

    def call(z, t, uncond, context, step, film):
        if together:
            return unet_call(torch.cat([z, z]), t, torch.cat([uncond, context]), step, film, [1, 0]).chunk(2)
        return unet_call(z, t, uncond, step, film, [1]), unet_call(z, t, context, step, film, [0])

    if inversion.kind == "nulltext":
        nulls = inversion.null_embeddings.to(device)
        uncond = lambda i: nulls[i:i + 1].expand(2, -1, -1)
    else:
        empty = inversion.uncond_embedding.to(device)
        uncond = lambda i: empty.expand(2, -1, -1)
    return (EditEps(call, uncond, progress(inversion.metadata["steps"] * edits, node_id)),
            alphas_cumprod(model.get_model_object("model_sampling").sigmas).to(device), device)
