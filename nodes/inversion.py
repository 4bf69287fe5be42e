"""Forgedit DDIM Inversion, Null-text Inversion and StyleDiffusion Train: a real image as a P2P_INVERSION that
attention-control edits start from (null-text inversion, Mokady et al. 2023; StyleDiffusion, Li et al. 2023)."""
import logging
import time

import torch

from ..forgedit_ops.ddim import ddim_invert, ddim_sample
from ..forgedit_ops.nulltext import null_text_optimize
from ..forgedit_ops.result import fingerprint
from ..forgedit_ops.stylediffusion import init_mapping, inner_steps, invert_with_maps, train_mappings
from .common import CATEGORY, check_widgets, queue_check, unet_fingerprint
from .inversion_run import (CROPS, Source, cached_inversion, copy_attend, decoded, eps_of, frozen_attend,
                            inversion_precision, inversion_result, prepare_source, source_features)
from .storage import disk_cache_input
from .training_inputs import DESCRIBE_SOURCE, check_size, photo_inputs, precision_input, seed_input, size_inputs
from .training import declared_settings, progress, training_copy
from .v3 import io

Inversion = io.Custom("P2P_INVERSION")
INVERSION_CATEGORY = f"{CATEGORY}/inversion"
NO_GRADIENT = lambda name: False


def inversion_inputs(steps: int, paper: str) -> list:
    """The inputs every inversion starts with, in this order."""
    return [
        *photo_inputs("encodes the source prompt and the empty prompt.",
                      "a caption (Forgedit Caption) or a few words; StyleDiffusion works from a single word. At most "
                      "75 tokens, no weight syntax.", "An SD1.x ε-prediction MODEL (Load Checkpoint)."),
        *size_inputs("references: 512", ""),
        io.Combo.Input("crop", options=list(CROPS), default="center (reference)",
                       tooltip="center: the largest centred region of the width:height aspect, then resized (the "
                               "references' square crop at 512x512). stretch: the whole image resized to width x height."),
        io.Int.Input("steps", default=steps, min=2, max=1000, tooltip=f"DDIM steps T over 1000 // T-spaced timesteps ({paper})."),
        io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1,
                       tooltip="Classifier-free guidance scale of the edits this inversion is for (references: 7.5)."),
    ]


def validate_inversion(cls, width=None, height=None, steps=None, source_prompt=None, crop=None, precision=None):
    def check():
        check_widgets(cls, dict(width=width, height=height, steps=steps, crop=crop, precision=precision))
        check_size(width, height)
        if source_prompt is not None and not source_prompt.strip():
            raise ValueError(f"source_prompt is empty: {DESCRIBE_SOURCE}")
    return queue_check(check)


class ForgeditDDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditDDIMInversion", display_name="Forgedit DDIM Inversion", category=INVERSION_CATEGORY,
            description="Deterministic DDIM inversion of the photo under its source prompt, without guidance (null-text "
                        "inversion §3): the baseline x_T for P2P edits. The reconstruction shows what guidance does to it.",
            inputs=[*inversion_inputs(50, "null-text inversion: 50; StyleDiffusion: 30")],
            outputs=[Inversion.Output(display_name="inversion"), io.Image.Output(display_name="reconstruction")],
            hidden=[io.Hidden.unique_id])

    validate_inputs = classmethod(validate_inversion)

    @classmethod
    def execute(cls, model, clip, vae, image, **widgets) -> io.NodeOutput:
        settings = declared_settings(cls, widgets)
        source, steps = prepare_source(model, clip, vae, image, settings), settings["steps"]
        started, tick = time.perf_counter(), progress(2 * steps, cls.hidden.unique_id)
        attend, abar, device, unet = frozen_attend(model)
        eps, (z0, c, u) = eps_of(attend), (t.to(device) for t in (source.z0, source.context, source.uncond))
        latents = ddim_invert(eps, z0, c, abar, steps, tick)
        z = ddim_sample(eps, latents[-1], c, u, abar, steps, settings["guidance"], tick)
        inv = inversion_result("ddim", source, latents[-1], unet_fingerprint(unet), settings, started, reconstruction=z)
        return io.NodeOutput(inv, decoded(model, vae, z))


class ForgeditNullTextInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditNullTextInversion", display_name="Forgedit Null-text Inversion", category=INVERSION_CATEGORY,
            description="Null-text inversion (Mokady et al. 2023, Algorithm 1): DDIM inversion, then per step the "
                        "unconditional embedding that makes the guided step land on the inversion's latent.",
            inputs=[*inversion_inputs(50, "null-text inversion: 50"),
                    io.Int.Input("inner_steps", default=10, min=1, max=1000,
                                 tooltip="Adam steps per DDIM step at most (paper: N = 10)."),
                    io.Boolean.Input("early_stop", default=True,
                                     tooltip="The reference's early stop: a step ends once its loss is below 1e-5 + 2e-5·i."),
                    precision_input(" Optimisation of ∅ and the losses stay fp32."), disk_cache_input()],
            outputs=[Inversion.Output(display_name="inversion"), io.Image.Output(display_name="reconstruction")],
            hidden=[io.Hidden.unique_id])

    validate_inputs = classmethod(validate_inversion)

    @classmethod
    def execute(cls, model, clip, vae, image, disk_cache=False, **widgets) -> io.NodeOutput:
        settings = declared_settings(cls, widgets)
        source = prepare_source(model, clip, vae, image, settings)
        inv = cached_inversion(disk_cache, model, "nulltext", settings, source,
                               lambda: null_text_inversion(model, source, settings, cls.hidden.unique_id))
        return io.NodeOutput(inv, decoded(model, vae, inv.reconstruction))


def null_text_inversion(model, source: Source, settings: dict, node_id):
    steps, started, losses = settings["steps"], time.perf_counter(), []
    cfg = inversion_precision(model, settings["precision"], settings["width"], settings["height"])
    with training_copy(model, NO_GRADIENT, cfg, steps * (1 + settings["inner_steps"]), node_id) as run:
        eps, tick = eps_of(copy_attend(run, cfg)), lambda *_: run.tick(0, 0.0)
        z0, c, u = (t.to(run.device).clone() for t in (source.z0, source.context, source.uncond))
        latents = ddim_invert(eps, z0, c, run.abar, steps, tick)
        nulls, z = null_text_optimize(eps, latents, c, u, run.abar, settings["guidance"], settings["inner_steps"],
                                      1e-5 if settings["early_stop"] else float("-inf"),
                                      lambda i, loss: (tick(), losses.append(loss)))
        base = unet_fingerprint(run.base)
    return inversion_result("nulltext", source, latents[-1], base, settings, started, metadata={"losses": losses},
                            null_embeddings=torch.cat(nulls), reconstruction=z)


class ForgeditStyleDiffusionTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditStyleDiffusionTrain", display_name="Forgedit StyleDiffusion Train", category=INVERSION_CATEGORY,
            description="StyleDiffusion (Li et al. 2023, §3): per DDIM step a mapping network turns the photo's CLIP "
                        "image features into the value input of every cross-attention layer, trained to reconstruct "
                        "the inversion with an attention regulariser. Edit it with P2P / P2Plus.",
            inputs=[*inversion_inputs(30, "StyleDiffusion: 30"),
                    io.ClipVision.Input("clip_vision", tooltip="OpenAI CLIP ViT-B/16 from Forgedit Image Encoder Loader."),
                    io.Int.Input("inner_steps", default=100, min=1, max=1000,
                                 tooltip="Iterations at the first step; step i trains ⌈N·e^(−0.1 i)⌉ (paper: 100, "
                                         "1015 iterations in all at T = 30)."),
                    io.Boolean.Input("attention_loss", default=True,
                                     tooltip="The attention regulariser (eq. 6) on the 16x16-level cross-attention "
                                             "maps (input blocks 7, 8, output blocks 3-5) at any image size."),
                    io.Boolean.Input("early_stop", default=True,
                                     tooltip="The reference's early stop: a step ends once its loss is below 1e-5 + 2e-5·i."),
                    seed_input("Seeds the first mapping network's initialisation (the reference leaves it unseeded)."),
                    precision_input(" The mapping networks and the losses stay fp32."), disk_cache_input()],
            outputs=[Inversion.Output(display_name="inversion"), io.Image.Output(display_name="reconstruction",
                     tooltip="The mapped guided reconstruction of the source (the reference's third panel).")],
            hidden=[io.Hidden.unique_id])

    validate_inputs = classmethod(validate_inversion)

    @classmethod
    def execute(cls, model, clip, vae, image, clip_vision, disk_cache=False, **widgets) -> io.NodeOutput:
        settings = declared_settings(cls, widgets)
        source = prepare_source(model, clip, vae, image, settings)
        features = source_features(clip_vision, source)
        inv = cached_inversion(disk_cache, model, "stylediffusion", {**settings, "features": fingerprint([("E", features)])},
                               source, lambda: stylediffusion(model, source, features, settings, cls.hidden.unique_id))
        return io.NodeOutput(inv, decoded(model, vae, inv.reconstruction))


def stylediffusion(model, source: Source, features, settings: dict, node_id):
    steps, started = settings["steps"], time.perf_counter()
    cfg = inversion_precision(model, settings["precision"], settings["width"], settings["height"])
    total = steps + sum(inner_steps(i, settings["inner_steps"]) for i in range(steps))
    with training_copy(model, NO_GRADIENT, cfg, total, node_id) as run:
        attend, tick = copy_attend(run, cfg), lambda *_: run.tick(0, 0.0)
        z0, c, u, e = (t.to(run.device).clone() for t in (source.z0, source.context, source.uncond, features))
        latents, maps = invert_with_maps(attend, z0, c, run.abar, steps, tick)
        use_attention_loss = settings["attention_loss"] and bool(maps[0])
        if settings["attention_loss"] and not maps[0]:
            logging.warning("Forgedit StyleDiffusion: this UNet has no cross-attention at input blocks 7, 8 or "
                            "output blocks 3-5; training without the attention loss")
        mapping = init_mapping(settings["seed"], e.shape[1]).to(run.device)
        trained = train_mappings(attend, latents, maps, c, u, e, run.abar, mapping, settings["guidance"],
                                 settings["inner_steps"], use_attention_loss, settings["early_stop"], tick)
        base = unet_fingerprint(run.base)
    mappings = [{k: v.float().cpu() for k, v in sd.items()} for sd in trained.mappings]
    return inversion_result("stylediffusion", source, latents[-1], base, settings, started,
                            metadata={"losses": trained.losses, "iterations": len(trained.losses)},
                            image_features=features, mapping=mappings, reconstruction=trained.reconstruction)
