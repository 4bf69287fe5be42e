"""Forgedit Interpolate and Forgedit Forget: the cheap editing steps after the fine-tune (Forgedit §4-5)."""
from comfy_api.latest import io

from ..forgedit_ops.forgetting import CUSTOM, DREAMBOOTH_STRATEGIES, STRATEGIES, forget_rule, forgetting_patches
from ..forgedit_ops.interpolation import interpolate, parse_values
from .common import CATEGORY, Result, require_matching_base, target_embedding

MODE_TOOLTIP = ("vs (vector subtraction): e = e_s + gamma (e_t - e_s). vp (vector projection): per token, the part of "
                "e_t orthogonal to e_s scaled by beta (= gamma here) plus alpha e_s. The paper's TEdBench picks are mostly "
                "vp with alpha 0.7 and beta 1.0-1.4.")
GAMMA_TOOLTIP = ("gamma for vs, beta for vp: one value or a list ('0.5, 0.6, 0.7' or '0.5:0.7:0.1'). 0 reconstructs the "
                 "image; the reference sweeps 0.0-1.6, the README demo uses 0.5-0.7 for vs.")
ALPHA_TOOLTIP = "vp only: weight of the source embedding, i.e. identity preservation (reference grid 0.8, 0.9, 1.1; paper picks 0.7)."


class ForgeditInterpolate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditInterpolate",
            display_name="Forgedit Interpolate",
            category=CATEGORY,
            description="Mixes the learned source embedding with the target prompt's (Forgedit §4). Several gammas give a "
                        "batched CONDITIONING: pair it with a latent batch of the same size.",
            inputs=[
                Result.Input("result", tooltip="From Forgedit Fine-tune or Forgedit Load."),
                io.Conditioning.Input("target", tooltip="CLIP Text Encode of the target prompt, e.g. 'a sitting dog'."),
                io.Combo.Input("mode", options=["vs", "vp"], default="vs", tooltip=MODE_TOOLTIP),
                io.String.Input("gamma", default="0.6", tooltip=GAMMA_TOOLTIP),
                io.Float.Input("alpha", default=0.7, min=0.0, max=2.0, step=0.05, tooltip=ALPHA_TOOLTIP),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, result, target, mode, gamma, alpha) -> io.NodeOutput:
        gammas = parse_values(gamma, "gamma")
        e = interpolate(result.source_embedding, target_embedding(target, result), mode, gammas, [alpha] * len(gammas))
        extras = dict(target[0][1])
        if "pooled_output" in extras:
            extras["pooled_output"] = extras["pooled_output"].expand(len(gammas), -1)
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
                                       "base. 0 = full reset (reference)."),
                io.String.Input("forget_pattern", default="", optional=True,
                                tooltip="custom (regex) only: a regular expression over UNet keys such as "
                                        "'input_blocks\\.[78]\\.'; matching learned tensors are forgotten."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, result, strategy, degree, forget_pattern="") -> io.NodeOutput:
        rule = forget_rule(strategy, forget_pattern)
        require_matching_base(model, result)
        edited = model.clone()
        deltas = {"diffusion_model." + k: (d,) for k, d in result.deltas.items()}
        for patches, strength in forgetting_patches(deltas, lambda k: rule(k.removeprefix("diffusion_model.")), degree):
            edited.add_patches(patches, strength)
        return io.NodeOutput(edited)
