"""Forgedit Inversion Save / Load and StyleDiffusion Import: P2P_INVERSION files in models/stylediffusion, and the
official StyleDiffusion checkpoints (.pth) with x_T and E(x) recomputed for the photo."""
import logging
import os
import time

import folder_paths

from ..forgedit_ops.ddim import ddim_invert
from ..forgedit_ops.p2p_inversion import load_inversion, save_inversion
from ..forgedit_ops.storage import DTYPES
from ..forgedit_ops.stylediffusion_import import read_official_mappings
from .common import check_widgets, queue_check, unet_fingerprint
from .inversion import INVERSION_CATEGORY, Inversion, inversion_inputs, validate_inversion
from .inversion_run import eps_of, frozen_attend, inversion_result, prepare_source, source_features
from .storage import PACK_VERSION, ignore_base_input, save_path
from .training import declared_settings, progress
from .v3 import io, ui

FOLDER = "stylediffusion"
folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
DTYPE_TOOLTIP = ("Precision of the StyleDiffusion mapping networks; x_T, the embeddings and E(x) are always fp32. fp32 "
                 "(default) is bit-exact; fp16 halves the mapping's 9.4 MB (T = 30).")


def files_ending(*suffixes: str) -> list[str]:
    """The files of every registered stylediffusion folder with one of these suffixes."""
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.lower().endswith(suffixes)]


class ForgeditInversionSave(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditInversionSave", display_name="Forgedit Inversion Save", category=INVERSION_CATEGORY,
            description="Saves an inversion (DDIM, null-text or StyleDiffusion: x_T, embeddings, null texts or mapping "
                        "networks, metadata) as one safetensors file in models/stylediffusion, to edit again later with "
                        "Forgedit Inversion Load without re-inverting.",
            inputs=[
                Inversion.Input("inversion", tooltip="From Forgedit DDIM / Null-text Inversion, StyleDiffusion Train or "
                                                     "StyleDiffusion Import."),
                io.String.Input("filename_prefix", default="inversion",
                                tooltip="File name inside models/stylediffusion; a counter is appended "
                                        "(inversion_00001_.safetensors). May contain sub-folders, e.g. 'dogs/ball'."),
                io.Combo.Input("dtype", options=list(DTYPES), default="fp32", tooltip=DTYPE_TOOLTIP),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dtype=None):
        return queue_check(check_widgets, cls, {"dtype": dtype})

    @classmethod
    def execute(cls, inversion, filename_prefix, dtype) -> io.NodeOutput:
        path = save_path(folder_paths.get_folder_paths(FOLDER)[0], filename_prefix)
        save_inversion(inversion, path, dtype, PACK_VERSION)
        return io.NodeOutput(ui=ui.PreviewText(path))


class ForgeditInversionLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditInversionLoad", display_name="Forgedit Inversion Load", category=INVERSION_CATEGORY,
            description="Loads an inversion saved by Forgedit Inversion Save; edit it like a fresh one, with the same "
                        "base MODEL it was inverted on.",
            inputs=[
                io.Combo.Input("file", options=files_ending(".safetensors"),
                               tooltip="A Forgedit Inversion Save file in models/stylediffusion."),
                ignore_base_input("Edits refuse a MODEL other than the one the inversion was made with"),
            ],
            outputs=[Inversion.Output(display_name="inversion")],
        )

    @classmethod
    def validate_inputs(cls, file=None):
        return queue_check(check_widgets, cls, {"file": file})

    @classmethod
    def execute(cls, file, ignore_base_mismatch) -> io.NodeOutput:
        inversion = load_inversion(folder_paths.get_full_path_or_raise(FOLDER, file))
        inversion.accept_any_base = ignore_base_mismatch
        return io.NodeOutput(inversion)


class ForgeditStyleDiffusionImport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditStyleDiffusionImport", display_name="Forgedit StyleDiffusion Import (official .pth)",
            category=INVERSION_CATEGORY,
            description="Uses the mapping networks of an official StyleDiffusion checkpoint (read without running any "
                        "code in it) for this photo: x_T by DDIM inversion and E(x) by the image encoder are recomputed, "
                        "as the official editing script does. Official checkpoints were trained on SD 1.4.",
            inputs=[*inversion_inputs(30, "StyleDiffusion and its official checkpoints: 30"),
                    io.ClipVision.Input("clip_vision", tooltip="OpenAI CLIP ViT-B/16 from Forgedit Image Encoder Loader."),
                    io.Combo.Input("pth_file", options=files_ending(".pth", ".pt"),
                                   tooltip="An official checkpoint (model-inner100-epoch1-learnv-<k>.pth: one mapping "
                                           "network per DDIM step) in models/stylediffusion, trained on this photo.")],
            outputs=[Inversion.Output(display_name="inversion")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, width=None, height=None, steps=None, source_prompt=None, crop=None, pth_file=None):
        verdict = validate_inversion(cls, width, height, steps, source_prompt, crop)
        return queue_check(check_widgets, cls, {"pth_file": pth_file}) if verdict is True else verdict

    @classmethod
    def execute(cls, model, clip, vae, image, clip_vision, **widgets) -> io.NodeOutput:
        settings = declared_settings(cls, widgets)
        name, steps = settings.pop("pth_file"), settings["steps"]
        mappings = read_official_mappings(folder_paths.get_full_path_or_raise(FOLDER, name))
        if len(mappings) != steps:
            raise ValueError(f"{name} holds {len(mappings)} mapping networks, one per DDIM step: set steps to "
                             f"{len(mappings)} (the inversion it was trained with)")
        source, started = prepare_source(model, clip, vae, image, settings), time.perf_counter()
        features = source_features(clip_vision, source)
        attend, abar, device, unet = frozen_attend(model)
        latents = ddim_invert(eps_of(attend), source.z0.to(device), source.context.to(device), abar, steps,
                              progress(steps, cls.hidden.unique_id))
        logging.warning("Forgedit StyleDiffusion Import: %s was trained on SD 1.4; its mapping networks are used with "
                        "this MODEL as they are (edits on another base may differ)", name)
        return io.NodeOutput(inversion_result("stylediffusion", source, latents[-1], unet_fingerprint(unet), settings,
                                              started, metadata={"imported": name}, image_features=features,
                                              mapping=mappings))
