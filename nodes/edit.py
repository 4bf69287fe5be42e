"""Forgedit Interpolate and Forgedit Forget: the cheap editing steps after the fine-tune (Forgedit §4-5)."""
import logging

from ..forgedit_ops.forgetting import CUSTOM, DREAMBOOTH_STRATEGIES, STRATEGIES, forget_rule, forgetting_patches
from ..forgedit_ops.interpolation import interpolate
from ..forgedit_ops.sweep import MAX_IMAGES, MODES, read_columns
from .common import CATEGORY, Result, given, queue_check, require_matching_base, target_embedding
from .v3 import io

MODE_TOOLTIP = ("vs (vector subtraction): e = e_s + gamma (e_t - e_s). vp (vector projection): per token, the part of "
                "e_t orthogonal to e_s scaled by beta (= gamma here) plus alpha e_s. The paper's TEdBench picks are mostly "
                "vp with alpha 0.7 and beta 1.0-1.4.")
GAMMA_TOOLTIP = ("gamma for vs, beta for vp: one value or a list ('0.5, 0.6, 0.7' or '0.5:0.7:0.1', at most 256 values). "
                 "0 reconstructs the image; the reference sweeps 0.0-1.6, the README demo uses 0.5-0.7 for vs, the "
                 "paper's vp picks beta 1.0-1.4.")
ALPHA_TOOLTIP = ("vp only (ignored in vs): weight of the source embedding, i.e. identity preservation; one value or a list "
                 "like gammas ('0.7, 0.9' or '0.7:0.9:0.1'). Reference grid 0.8, 0.9, 1.1; the paper picks 0.7.")
# Where Forgedit Forget marks its MODEL: model_options survives clone(), so LoRA or sampling patches downstream keep it.
RESULT_MARK = "forgedit_result"


def carries_result(model, result) -> bool:
    """Whether the MODEL came out of Forgedit Forget for this result (its learned deltas, minus what was forgotten)."""
    return model.model_options.get(RESULT_MARK) == result.token


def check_forgetting(strategy, forget_pattern) -> None:
    """Queue-time check of the §5 strategy and the custom regex; linked ones (None) are checked when the node runs."""
    if strategy is not None and not (strategy == CUSTOM and forget_pattern is None):
        forget_rule(strategy, forget_pattern)


class ForgeditInterpolate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditInterpolate",
            display_name="Forgedit Interpolate",
            category=CATEGORY,
            description="Mixes the learned source embedding with the target prompt's (Forgedit §4). Several settings give "
                        "a batched CONDITIONING, one row per setting in Forgedit Sampler's column order (vp: every alpha "
                        "x every gamma, alpha-major; vs: every gamma): pair it with a latent batch of the same size.",
            inputs=[
                Result.Input("result", tooltip="From Forgedit Fine-tune or Forgedit Load."),
                io.Conditioning.Input("target", tooltip="CLIP Text Encode of the target prompt, e.g. 'a sitting dog'."),
                io.Combo.Input("mode", options=list(MODES), default="vs", tooltip=MODE_TOOLTIP),
                io.String.Input("gammas", default="0.6", tooltip=GAMMA_TOOLTIP),
                io.String.Input("alphas", default="0.7", tooltip=ALPHA_TOOLTIP + f" At most {MAX_IMAGES} settings."),
                io.Float.Input("gamma", optional=True, force_input=True,
                               tooltip="Optional: Forgedit Score's gamma; when connected it replaces gammas."),
                io.Float.Input("alpha", optional=True, force_input=True,
                               tooltip="Optional: Forgedit Score's alpha (vp); when connected it replaces alphas."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def validate_inputs(cls, mode=None, gammas=None, alphas=None) -> bool | str:
        """Queue-time check of the mode and the lists (Forgedit §4); linked ones are checked when the node runs."""
        return queue_check(read_columns, given(mode, "vs"), given(gammas, "0"), given(alphas, "0"))

    @classmethod
    def execute(cls, result, target, mode, gammas, alphas, gamma=None, alpha=None) -> io.NodeOutput:
        columns = read_columns(mode, gammas if gamma is None else repr(gamma), alphas if alpha is None else repr(alpha))
        e = interpolate(result.source_embedding, target_embedding(target, result), mode, [g for _, g in columns],
                        [a for a, _ in columns])
        extras = dict(target[0][1])
        if "pooled_output" in extras:
            extras["pooled_output"] = extras["pooled_output"].expand(len(columns), -1)
        return io.NodeOutput([[e, extras]])


class ForgeditForget(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditForget",
            display_name="Forgedit Forget",
            category=CATEGORY,
            description="Applies the learned UNet to a clone of the base MODEL, resetting the blocks a forgetting strategy "
                        "names (Forgedit §5). Forget the encoder for pose/layout edits, the decoder for appearance edits.",
            inputs=[
                io.Model.Input("model", tooltip="The same base MODEL that went into Forgedit Fine-tune; it is not modified."),
                Result.Input("result", tooltip="From Forgedit Fine-tune or Forgedit Load."),
                io.Combo.Input("strategy", options=[*STRATEGIES, *DREAMBOOTH_STRATEGIES, CUSTOM], default="donotforget",
                               tooltip="donotforget keeps everything learned (reference default). Non-rigid edits (pose, "
                                       "action): encoderattn, stronger encoderkv/noencoder, milder encoderattn+encoder1. "
                                       "Appearance edits: decoderattn, stronger decoderkv, milder decoderattn+decoder2. "
                                       "These forget only Forgedit's trained blocks (a whole-UNet Imagic result keeps "
                                       "the rest; forgedit-imagic: encoderattn). dreambooth: the reference's rules for "
                                       "results that trained everything (Forgedit DreamBooth), blocks 0 included; "
                                       "'encoderkv only' resets just the encoder's cross-attention K/V."),
                io.Float.Input("degree", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="How much of the learned weights the forgotten blocks keep: p = c learned + (1-c) "
                                       "base. 0 = full reset (reference). A strategy that forgets every learned tensor at "
                                       "0 leaves the base model (logged): the edit then comes from the embedding alone."),
                io.String.Input("forget_pattern", default="", optional=True,
                                tooltip="custom (regex) only: a regular expression over UNet keys such as "
                                        "'input_blocks\\.[78]\\.'; matching learned tensors are forgotten."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, strategy=None, forget_pattern=None) -> bool | str:
        return queue_check(check_forgetting, strategy, forget_pattern)

    @classmethod
    def execute(cls, model, result, strategy, degree, forget_pattern="") -> io.NodeOutput:
        rule = forget_rule(strategy, forget_pattern)
        require_matching_base(model, result)
        edited = model.clone()
        edited.model_options[RESULT_MARK] = result.token
        deltas = {"diffusion_model." + k: (d,) for k, d in result.deltas.items()}
        groups = forgetting_patches(deltas, lambda k: rule(k.removeprefix("diffusion_model.")), degree)
        for patches, strength in groups:
            edited.add_patches(patches, strength)
        if not groups:
            logging.warning("Forgedit Forget: strategy %r at degree %g forgets all %d learned UNet tensors; nothing learned "
                            "remains in this MODEL, which is the base model (the edit comes from the interpolated "
                            "embedding alone)", strategy, degree, len(deltas))
        return io.NodeOutput(edited)
