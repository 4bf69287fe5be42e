"""Forgedit Caption: the source prompt from BLIP, captioned as the reference does it (Forgedit §2)."""
import os

import comfy.model_management
import folder_paths
import torch
from transformers import BlipForConditionalGeneration, BlipProcessor

from ..forgedit_ops.caption import source_prompt, to_pil
from .common import CATEGORY, check_widgets, queue_check, require_one_image
from .v3 import io

folder_paths.add_model_folder_path("blip", os.path.join(folder_paths.models_dir, "blip"))
NO_MODEL = "(no BLIP model in models/blip)"
INSTALL = ("put Salesforce/blip-image-captioning-base (the Hugging Face folder with config.json, the model weights and "
           "the processor files) into ComfyUI/models/blip/<name>/ and refresh")


def blip_folders() -> list[str]:
    """The model folders inside every registered blip path (models/blip and extra_model_paths.yaml entries)."""
    roots = [p for p in folder_paths.get_folder_paths("blip") if os.path.isdir(p)]
    names = {e.name for root in roots for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")}
    return sorted(names) or [NO_MODEL]


def blip_path(name: str) -> str:
    """The folder of the chosen BLIP model, or the install instructions."""
    for root in folder_paths.get_folder_paths("blip"):
        if name != NO_MODEL and os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    raise ValueError(f"BLIP model {name!r} not found: {INSTALL}")


def blip_caption(folder: str, image: torch.Tensor) -> str:
    """Unconditional BLIP caption of the original-size image: greedy, at most 20 tokens, fp32, special tokens skipped."""
    device = comfy.model_management.get_torch_device()
    try:
        processor = BlipProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
        model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    except OSError as e:
        raise ValueError(f"cannot load the BLIP model in {folder} ({e}); {INSTALL}") from None
    comfy.model_management.free_memory(2 * comfy.model_management.module_size(model), device)
    inputs = processor(images=to_pil(image), return_tensors="pt").to(device)
    out = model.to(device, torch.float32).generate(**inputs, max_length=20, num_beams=1, do_sample=False)
    return processor.decode(out[0], skip_special_tokens=True)


class ForgeditCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditCaption",
            display_name="Forgedit Caption",
            category=CATEGORY,
            description="Describes the image with BLIP (the paper's source prompt): greedy, at most 20 tokens, on the "
                        "original image. BLIP is loaded for the caption and freed right after. Needs a BLIP folder in "
                        "models/blip (Salesforce/blip-image-captioning-base, as the paper).",
            inputs=[
                io.Image.Input("image", tooltip="The photo to edit (a batch of 1), at its original size."),
                io.Combo.Input("blip_model", options=blip_folders(),
                               tooltip="A Hugging Face BLIP captioning folder in models/blip. The paper uses "
                                       "Salesforce/blip-image-captioning-base; other variants may caption worse."),
                io.String.Input("target_prompt", default="", optional=True,
                                tooltip="Optional target prompt: if it contains 'A photo of ' (exact case), the caption "
                                        "gets the same prefix, as in the reference."),
            ],
            outputs=[io.String.Output(display_name="source_prompt")],
        )

    @classmethod
    def validate_inputs(cls, blip_model=None):
        return queue_check(check_widgets, cls, {"blip_model": blip_model})

    @classmethod
    def execute(cls, image, blip_model, target_prompt="") -> io.NodeOutput:
        require_one_image(image)
        caption = blip_caption(blip_path(blip_model), image[0])
        comfy.model_management.soft_empty_cache()
        return io.NodeOutput(source_prompt(caption, target_prompt))
