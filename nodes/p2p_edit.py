"""Forgedit P2P / P2Plus Edit: Prompt-to-Prompt (Hertz et al. 2022) and StyleDiffusion's P2Plus (Li et al. 2023,
§3.3) from any inversion: the source and the target denoised together from x_T with their attention tied."""
import itertools
import logging

import torch

from ..forgedit_ops.images import labelled_grid
from ..forgedit_ops.interpolation import parse_values
from ..forgedit_ops.p2p_control import EDIT_TYPES
from ..forgedit_ops.p2p_edit import p2p_sample
from .common import CATEGORY, check_widgets, queue_check
from .inversion import Inversion
from .p2p_setup import (ALIGNERS, BATCH_MODES, SELF_LEVELS, check_edit_text, edit_eps, edit_plan, require_inversion_base)
from .v3 import io

TAU_EXAMPLE = ("0.2, 0.5", "0.2:0.6:0.1")
TAUS = ("tau_v", "tau_c", "tau_s", "tau_u")
# An empty τ takes the inversion kind's default: StyleDiffusion's README (τ_v .5, τ_c .6, τ_s .6, τ_u 0), the null-text
# notebook (τ_c .8, τ_s .5) for null-text and plain DDIM inversions (τ_v has no effect there).
KIND_DEFAULTS = {"stylediffusion": ("0.5", "0.6", "0.6", "0"), "nulltext": ("0", "0.8", "0.5", "0"),
                 "ddim": ("0", "0.8", "0.5", "0")}
MAX_COMBINATIONS = 64


def tau_input(name: str, tooltip: str):
    return io.String.Input(name, default="", tooltip=tooltip + " Empty: the inversion kind's default. One value, a "
                                                               "list '0.2, 0.5' or a range '0.2:0.6:0.1': every "
                                                               "combination is edited.")


def tau_lists(values: dict, kind: str = "stylediffusion") -> list[tuple[float, ...]]:
    """Every (τ_v, τ_c, τ_s, τ_u) combination of the lists (an empty one: the kind's default), each τ in [0, 1]."""
    lists = []
    for name, default in zip(TAUS, KIND_DEFAULTS[kind]):
        taus = parse_values(values[name].strip() or default, name, TAU_EXAMPLE)
        if any(not 0 <= t <= 1 for t in taus):
            raise ValueError(f"{name}: every τ is a fraction of the steps, between 0 and 1 (got {values[name]!r})")
        lists.append(taus)
    combos = list(itertools.product(*lists))
    if len(combos) > MAX_COMBINATIONS:
        raise ValueError(f"{' x '.join(TAUS)} make {len(combos)} edits; at most {MAX_COMBINATIONS}")
    return combos


class ForgeditP2PEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditP2PEdit", display_name="Forgedit P2P / P2Plus Edit", category=f"{CATEGORY}/inversion",
            description="Edits an inversion toward a target prompt with attention control: Prompt-to-Prompt word swap "
                        "or refinement, reweighting and LocalBlend, StyleDiffusion's mapped values (τ_v) and P2Plus's "
                        "unconditional self-attention injection (τ_u). Works from DDIM, null-text and StyleDiffusion "
                        "inversions, and from a MODEL out of Forgedit Forget inverted the same way.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL the inversion was made with (never modified)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint: encodes and tokenises the target."),
                io.Vae.Input("vae", tooltip="Decodes the source reconstruction and the edits."),
                Inversion.Input("inversion", tooltip="From Forgedit DDIM / Null-text Inversion, StyleDiffusion Train, "
                                                     "Inversion Load or StyleDiffusion Import."),
                io.String.Input("target_prompt", multiline=True, default="",
                                tooltip="The source prompt with words swapped (replace: same word count) or added "
                                        "(refine). At most 75 tokens, no weight syntax."),
                io.Combo.Input("edit_type", options=list(EDIT_TYPES), default="replace",
                               tooltip="replace: word swap (P2P's AttentionReplace). refine: words added or changed "
                                       "(Needleman-Wunsch alignment). reconstruct: the source again, for both items."),
                tau_input("tau_v", "τ_v (StyleDiffusion only): the target uses the mapped values for the first "
                                   "⌈T·τ_v⌉ steps (README: 0.5)."),
                tau_input("tau_c", "τ_c: the target's cross-attention maps follow the source's for the first "
                                   "int((T+1)·τ_c) steps (StyleDiffusion 0.6, null-text notebook 0.8)."),
                tau_input("tau_s", "τ_s: self-attention maps of ≤ 32² queries injected for int(T·τ_s) steps "
                                   "(StyleDiffusion 0.6, null-text notebook 0.5)."),
                tau_input("tau_u", "τ_u (P2Plus): the same injection in the unconditional branch for int(T·τ_u) "
                                   "steps (0 = plain P2P; StyleDiffusion's examples 0.5)."),
                io.String.Input("blend_source_words", default="",
                                tooltip="LocalBlend: words of the source prompt whose region may change, e.g. 'dog'. "
                                        "Empty (and target words empty): no LocalBlend."),
                io.String.Input("blend_target_words", default="", tooltip="LocalBlend: the target's words, e.g. 'tiger'."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="LocalBlend's mask threshold on the normalised word maps (P2P: 0.3)."),
                io.Float.Input("blend_start", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="LocalBlend acts from step int(T·start) on (P2P: 0.2)."),
                io.String.Input("reweight", default="", tooltip="Reweighting inside τ_c: 'tiger:2, striped:1.5' "
                                                                "scales those target words' maps (P2P's equalizer)."),
                io.Combo.Input("aligner", options=list(ALIGNERS), default="reference",
                               tooltip="reference: P2P's word-swap mapper, including its tail quirk when the swapped "
                                       "words have different token counts. fixed: later tokens keep their offset."),
                io.Combo.Input("selfattn_levels", options=list(SELF_LEVELS), default="reference",
                               tooltip="reference: self-attention injected where a map has ≤ 32² queries (all but "
                                       "the finest level at 512²). relative: all but the finest level at any size."),
                io.Combo.Input("batch_mode", options=list(BATCH_MODES), default="auto",
                               tooltip="together: source, target, cond and uncond in one UNet call. separate: uncond "
                                       "then cond (the reference's low-resource mode; half the activations). auto: "
                                       "together unless the free memory is short. The results are the same."),
                io.Float.Input("guidance", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance; 0 uses the inversion's (references: 7.5)."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="Per τ combination: the source reconstruction "
                                                                      "then the edit."),
                     io.Image.Output(display_name="images"), io.Image.Output(display_name="grid")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, target_prompt=None, edit_type=None, aligner=None, selfattn_levels=None, batch_mode=None,
                        reweight=None, blend_source_words=None, blend_target_words=None, tau_v=None, tau_c=None,
                        tau_s=None, tau_u=None):
        taus = dict(tau_v=tau_v, tau_c=tau_c, tau_s=tau_s, tau_u=tau_u)

        def check():
            check_widgets(cls, dict(edit_type=edit_type, aligner=aligner, selfattn_levels=selfattn_levels,
                                    batch_mode=batch_mode))
            check_edit_text(target_prompt, edit_type, reweight, blend_source_words, blend_target_words)
            if None not in taus.values():
                tau_lists(taus)
        return queue_check(check)

    @classmethod
    def execute(cls, model, clip, vae, inversion, target_prompt, edit_type, tau_v, tau_c, tau_s, tau_u,
                blend_source_words, blend_target_words, blend_threshold, blend_start, reweight, aligner,
                selfattn_levels, batch_mode, guidance) -> io.NodeOutput:
        combos = tau_lists(dict(tau_v=tau_v, tau_c=tau_c, tau_s=tau_s, tau_u=tau_u), inversion.kind)
        require_inversion_base(model, inversion)
        plan = edit_plan(clip, inversion, target_prompt, edit_type, reweight, aligner, blend_source_words,
                         blend_target_words, blend_threshold, blend_start, selfattn_levels)
        inverted_for = inversion.metadata.get("guidance", 7.5)
        if guidance and guidance != inverted_for and inversion.kind != "ddim":
            logging.warning("Forgedit P2P / P2Plus Edit: guidance %g, but this %s inversion was optimised for %g; the "
                            "source will not reconstruct as closely", guidance, inversion.kind, inverted_for)
        guidance = guidance or inverted_for
        eps, abar, device = edit_eps(model, inversion, batch_mode, cls.hidden.unique_id, len(combos))
        x_T, context = inversion.x_T.to(device), plan.context.to(device)
        latents = [p2p_sample(eps.call, x_T, context, eps.uncond, abar, plan.steps, guidance, plan.step_state(*taus),
                              plan.local_blend, eps.tick).float().cpu() for taus in combos]
        samples = model.model.process_latent_out(torch.cat(latents))
        images = vae.decode(samples)
        labels = [", ".join(f"{n[4:]} {t:g}" for n, t in zip(TAUS, taus)) for taus in combos] if len(combos) > 1 else [""]
        grid = labelled_grid(images, len(combos), 2, labels, ["source", "edit"])
        return io.NodeOutput({"samples": samples}, images, grid)
