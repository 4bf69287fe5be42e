"""Forgedit Imagic: Imagic's sequential optimisation (Imagic §3.1) and Forgedit transferred to Imagic (Forgedit §8)."""
from ..forgedit_ops.imagic import RECIPES
from .common import CATEGORY, Result, queue_check
from .storage import disk_cache_input
from .training import METHODS, declared_settings, fine_tune
from .training_inputs import DESCRIBE_SOURCE, check_training_settings, photo_inputs, precision_input, seed_input, size_inputs
from .v3 import io

RECIPE_TOOLTIP = ("imagic (paper): embedding from the target prompt, 1000 steps at 2e-3, then the whole UNet 1500 steps "
                  "at 5e-7. imagic (diffusers): the community pipeline, 500 at 1e-3 then 1000 at 2e-6. forgedit-imagic "
                  "(Forgedit §8): embedding from the source prompt, 400 text steps then 1000 UNet steps on Forgedit's "
                  "encoder/decoder blocks 1-3 (lrs 1e-3 / 2e-6, our choice); forget encoderattn when editing.")


def init_prompt(recipe: str) -> str:
    """The prompt input the recipe's embedding starts from (Imagic §3.1: e_tgt; Forgedit §8: the source caption)."""
    return METHODS[RECIPES[recipe].method].init + "_prompt"


def prompt_checks(recipe) -> dict:
    if recipe not in RECIPES:
        return {}
    name = init_prompt(recipe)
    return {name: DESCRIBE_SOURCE if name == "source_prompt" else f"{recipe} starts the embedding from the target prompt"}


def resolved(settings: dict) -> dict:
    """The settings with 0 replaced by the recipe's step counts and learning rates (what actually trains)."""
    recipe = RECIPES[settings["recipe"]]
    return {**settings, **{k: settings[k] or getattr(recipe, k) for k in ("text_steps", "unet_steps", "text_lr", "unet_lr")}}


class ForgeditImagic(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditImagic",
            display_name="Forgedit Imagic",
            category=CATEGORY,
            description="Imagic's sequential optimisation: first the text embedding with the UNet frozen, then the UNet "
                        "with the embedding frozen (Imagic §3.1). Edit with Forgedit Interpolate / Sampler in vs mode: "
                        "gamma is Imagic's eta (e = eta e_tgt + (1 - eta) e_opt; paper 0.6-0.8, > 1 extrapolates).",
            inputs=[
                *photo_inputs("encodes the initial embedding and the empty negative.",
                              "Forgedit Caption or typed, at most 75 tokens. The initial embedding of forgedit-imagic; "
                              "unused by the imagic recipes."),
                io.String.Input("target_prompt", multiline=True, default="",
                                tooltip="The edit, e.g. 'a photo of a sitting dog' (at most 75 tokens). The initial "
                                        "embedding of the imagic recipes (Imagic §3.1: e_opt starts at e_tgt); encode "
                                        "the same text with CLIP Text Encode as the target when editing."),
                io.Combo.Input("recipe", options=list(RECIPES), default="imagic (paper)", tooltip=RECIPE_TOOLTIP),
                *size_inputs("Imagic SD: 512"),
                io.Int.Input("text_steps", default=0, min=0, max=100000,
                             tooltip="Stage-1 embedding steps; 0 = the recipe's (paper 1000, diffusers 500, forgedit-imagic 400)."),
                io.Int.Input("unet_steps", default=0, min=0, max=100000,
                             tooltip="Stage-2 UNet steps; 0 = the recipe's (paper 1500, diffusers 1000, forgedit-imagic 1000)."),
                io.Float.Input("text_lr", default=0.0, min=0.0, max=1e-1, step=1e-5,
                               tooltip="Stage-1 Adam learning rate; 0 = the recipe's (paper 2e-3, diffusers 1e-3, forgedit-imagic 1e-3)."),
                io.Float.Input("unet_lr", default=0.0, min=0.0, max=1e-2, step=1e-7,
                               tooltip="Stage-2 Adam learning rate; 0 = the recipe's (paper 5e-7, diffusers 2e-6, forgedit-imagic 2e-6)."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Copies of the one latent per step, each with its own noise and timestep (Imagic: 1)."),
                seed_input("Seeds the training noise and timesteps of both stages."),
                precision_input(" Imagic A4: the masters must be fp32, 5e-7 steps vanish in fp16 weights."),
                disk_cache_input(),
            ],
            outputs=[Result.Output(display_name="result")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None, source_prompt=None, target_prompt=None, recipe=None, precision=None):
        values = dict(width=width, height=height, source_prompt=source_prompt, target_prompt=target_prompt,
                      recipe=recipe, precision=precision)
        return queue_check(check_training_settings, cls, values, prompt_checks(recipe))

    @classmethod
    def execute(cls, model, clip, vae, image, disk_cache=False, **widgets) -> io.NodeOutput:
        settings = declared_settings(cls, widgets)
        check_training_settings(cls, settings, prompt_checks(settings["recipe"]))
        settings = resolved(settings)
        method = METHODS[RECIPES[settings["recipe"]].method]
        cfg = {k: settings[k] for k in ("batch_size", "text_lr", "unet_lr", "seed")}
        result = fine_tune(method, model, clip, vae, image, settings, cfg, settings["text_steps"] + settings["unet_steps"],
                           cls.hidden.unique_id, disk_cache)
        return io.NodeOutput(result)
