"""Forgedit Save, Load and Export LoRA, and the fine-tune's disk cache: results as safetensors files in models/forgedit."""
import logging
import os
import re
from pathlib import Path

import folder_paths

from ..forgedit_ops.forgetting import CUSTOM, DREAMBOOTH_STRATEGIES, STRATEGIES, forget_rule
from ..forgedit_ops.result import fingerprint
from ..forgedit_ops.storage import DTYPES, FORMAT, cache_key, load_result, lora_state_dict, metadata_header, save_result, write
from .common import CATEGORY, Result, check_widgets, loaded_unet, queue_check, unet_fingerprint
from .edit import check_forgetting
from .v3 import io, ui

folder_paths.add_model_folder_path("forgedit", os.path.join(folder_paths.models_dir, "forgedit"))
PACK_VERSION = re.search(r'^version\s*=\s*"([^"]+)"', (Path(__file__).parents[1] / "pyproject.toml").read_text(), re.M)[1]
CACHE = "cache"
DTYPE_TOOLTIP = ("fp16 (default) halves the file (SD1.5: 1.18 GB instead of 2.35 GB); it rounds the learned change far "
                 "below the precision of fp16 weights. fp32 is bit-exact.")


def saved_results() -> list[str]:
    """The result files of every registered forgedit folder, disk-cache entries left out."""
    return [f for f in folder_paths.get_filename_list("forgedit") if f.endswith(".safetensors") and Path(f).parts[0] != CACHE]


def save_path(folder: str, filename_prefix: str) -> str:
    """The next free `<prefix>_00001_.safetensors` in `folder` (core SaveLoRA naming; the prefix may hold sub-folders)."""
    out, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, folder)
    return os.path.join(out, f"{name}_{counter:05}_.safetensors")


def finetune_cache_key(model, settings: dict, image, z0, e_src) -> str:
    """Disk-cache key of a fine-tune: the widget values, the resized image, the base UNet, the training latent and the
    source embedding (another VAE or CLIP misses too) and the pack version."""
    values = {**settings, "base": unet_fingerprint(loaded_unet(model)), "version": PACK_VERSION,
              "encoded": fingerprint([("latent", z0), ("source", e_src)])}
    return cache_key(values, {"image": image})


def load_cached(key: str, load=load_result):
    """The cached result (or inversion) of this key from any forgedit folder's cache/."""
    for root in folder_paths.get_folder_paths("forgedit"):
        path = os.path.join(root, CACHE, key + ".safetensors")
        if os.path.isfile(path):
            logging.info("Forgedit fine-tune: reusing %s from the disk cache", path)
            return load(path)
    return None


def ignore_base_input(refusal: str):
    """Load's switch for applying a file to weights other than those it was made with."""
    return io.Boolean.Input("ignore_base_mismatch", default=False,
                            tooltip=f"{refusal} (checkpoint and LoRAs). Turn on to apply it anyway, e.g. to a close "
                                    "fine-tune of the same base; results vary.")


def disk_cache_input():
    return io.Boolean.Input("disk_cache", default=False, optional=True,
                            tooltip="Keep the result in models/forgedit/cache (fp32, 2.35 GB for SD1.5's Forgedit set) and "
                                    "reuse it when image, prompts, settings, seed and models are the same: survives "
                                    "restarts and --cache-none. Change the seed to retrain on purpose.")


def cached_or_trained(disk_cache: bool, model, settings: dict, image, z0, e_src, train, load=load_result,
                      save=save_result):
    """The optional disk cache around a fine-tune (or an inversion, with its load and save): a hit loads the stored
    result, a miss runs train() and stores it."""
    key = disk_cache and finetune_cache_key(model, settings, image, z0, e_src)
    if key and (cached := load_cached(key, load)):
        return cached
    result = train()
    if key:
        store_cached(key, result, save)
    return result


def store_cached(key: str, result, save=save_result) -> None:
    """Keep a fine-tune in models/forgedit/cache/ (fp32, so a hit equals the trained result); a full disk only warns."""
    path = os.path.join(folder_paths.get_folder_paths("forgedit")[0], CACHE, key + ".safetensors")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save(result, path, "fp32", PACK_VERSION)
    except OSError as e:
        logging.warning("Forgedit fine-tune: could not write the disk cache %s (%s)", path, e)


class ForgeditSave(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditSave",
            display_name="Forgedit Save",
            category=CATEGORY,
            description="Saves a fine-tuned result (UNet delta, learned source embedding, metadata) as one safetensors "
                        "file in models/forgedit, to edit again later with Forgedit Load without retraining.",
            inputs=[
                Result.Input("result", tooltip="From Forgedit Fine-tune."),
                io.String.Input("filename_prefix", default="forgedit",
                                tooltip="File name inside models/forgedit; a counter is appended (forgedit_00001_.safetensors). "
                                        "May contain sub-folders, e.g. 'cats/sitting'."),
                io.Combo.Input("dtype", options=list(DTYPES), default="fp16",
                               tooltip="Precision of the UNet delta; the embeddings are always fp32. " + DTYPE_TOOLTIP),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dtype=None):
        return queue_check(check_widgets, cls, {"dtype": dtype})

    @classmethod
    def execute(cls, result, filename_prefix, dtype) -> io.NodeOutput:
        path = save_path(folder_paths.get_folder_paths("forgedit")[0], filename_prefix)
        save_result(result, path, dtype, PACK_VERSION)
        return io.NodeOutput(ui=ui.PreviewText(path))


class ForgeditLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditLoad",
            display_name="Forgedit Load",
            category=CATEGORY,
            description="Loads a result saved by Forgedit Save; use it like the output of Forgedit Fine-tune (Forget, "
                        "Interpolate, Sampler) with the same base MODEL it was trained on.",
            inputs=[
                io.Combo.Input("file", options=saved_results(), tooltip="A Forgedit Save file in models/forgedit."),
                ignore_base_input("Forgedit Forget refuses a MODEL other than the one the result was trained on"),
            ],
            outputs=[Result.Output(display_name="result")],
        )

    @classmethod
    def validate_inputs(cls, file=None):
        return queue_check(check_widgets, cls, {"file": file})

    @classmethod
    def execute(cls, file, ignore_base_mismatch) -> io.NodeOutput:
        result = load_result(folder_paths.get_full_path_or_raise("forgedit", file))
        result.accept_any_base = ignore_base_mismatch
        return io.NodeOutput(result)


class ForgeditExportLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditExportLora",
            display_name="Forgedit Export LoRA",
            category=CATEGORY,
            description="Writes the learned UNet weights, with a forgetting strategy baked in, as a LoRA file in "
                        "models/loras that core LoraLoaderModelOnly applies (ComfyUI 'diff' format: full rank, no low-rank "
                        "approximation). The learned embedding is not in it: keep the Forgedit Save file for Forgedit "
                        "Interpolate.",
            inputs=[
                Result.Input("result", tooltip="From Forgedit Fine-tune or Forgedit Load."),
                io.Combo.Input("strategy", options=[*STRATEGIES, *DREAMBOOTH_STRATEGIES, CUSTOM], default="donotforget",
                               tooltip="Forgetting baked into the file, as in Forgedit Forget: donotforget keeps everything "
                                       "learned; encoder* strategies for pose/layout edits, decoder* for appearance edits."),
                io.Float.Input("degree", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="How much of the learned weights the forgotten blocks keep (0 = full reset), as in "
                                       "Forgedit Forget."),
                io.String.Input("filename_prefix", default="forgedit/forgedit",
                                tooltip="File name inside models/loras; a counter is appended (forgedit/forgedit_00001_.safetensors)."),
                io.Combo.Input("dtype", options=list(DTYPES), default="fp16", tooltip=DTYPE_TOOLTIP),
                io.String.Input("forget_pattern", default="", optional=True,
                                tooltip="custom (regex) only: a regular expression over UNet keys such as "
                                        "'input_blocks\\.[78]\\.'; matching learned tensors are forgotten."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, strategy=None, dtype=None, forget_pattern=None):
        def check():
            check_widgets(cls, {"dtype": dtype})
            check_forgetting(strategy, forget_pattern)
        return queue_check(check)

    @classmethod
    def execute(cls, result, strategy, degree, filename_prefix, dtype, forget_pattern="") -> io.NodeOutput:
        rule = forget_rule(strategy, forget_pattern)
        path = save_path(folder_paths.get_folder_paths("loras")[0], filename_prefix)
        header = metadata_header(result.metadata, lora=FORMAT, version=PACK_VERSION, strategy=strategy,
                                 forget_pattern=forget_pattern, degree=str(degree), deltas_dtype=dtype)
        write(lora_state_dict(result.deltas, rule, degree, dtype), path, header)
        return io.NodeOutput(ui=ui.PreviewText(path))
