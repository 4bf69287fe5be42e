"""What the Forgedit nodes share: the result type, model checks, text encoding and loading the base UNet."""
import logging

import comfy.ldm.modules.attention as attention
import comfy.model_sampling
import comfy.supported_models
import torch

from ..forgedit_ops.result import ForgeditResult, fingerprint
from .host import materialized, with_sdpa
from .v3 import io

Result = io.Custom("FORGEDIT_RESULT")
CATEGORY = "forgedit"


def sdpa_on_cpu(model):
    """ComfyUI falls back to sub-quadratic attention on a CPU unless told otherwise; SDPA computes the same attention
    there about 1.4x faster (SD1.5 at 256x256). Returns a clone that uses it, or the MODEL unchanged elsewhere."""
    if model.load_device.type != "cpu" or attention.optimized_attention is not attention.attention_sub_quad:
        return model
    return with_sdpa(model)


# The checkpoint families Forgedit fine-tunes, by ComfyUI's exact model config class: a subclass (SD 2 unCLIP, Lotus,
# instruct-pix2pix, the x4 upscaler) conditions its UNet on more than a latent and a text.
FAMILIES = {comfy.supported_models.SD15: "SD 1.x", comfy.supported_models.SD20: "SD 2.x"}
PREDICTIONS = {comfy.model_sampling.EPS.calculate_denoised: "eps",
               comfy.model_sampling.V_PREDICTION.calculate_denoised: "v"}


def family(model):
    """"SD 1.x" or "SD 2.x" for a text-to-image checkpoint of those families (4 latent channels in), else None."""
    config = model.model.model_config
    return FAMILIES.get(type(config)) if config.unet_config.get("in_channels") == 4 else None


def sampled_prediction(model):
    """"eps" or "v" when the MODEL samples a discrete schedule predicting that, else None (LCM, x0, EDM, ...)."""
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
        return None
    return PREDICTIONS.get(type(sampling).calculate_denoised)


def prediction_type(model) -> str:
    """What the UNet of an SD 1.x / 2.x MODEL predicts, "eps" or "v" (Salimans & Ho 2022, §4), as its sampling says;
    any other family or sampling gets an actionable error."""
    if family(model) is None:
        raise ValueError(f"Forgedit fine-tunes SD 1.x and SD 2.x text-to-image checkpoints (SD 1.4/1.5, SD 2.0/2.1 512 "
                         f"and 768-v, and fine-tunes of them); this MODEL is {type(model.model.model_config).__name__}, "
                         "which is not one (SDXL, SD 2 unCLIP, inpainting and other models are not supported). Load "
                         "one with Load Checkpoint.")
    prediction = sampled_prediction(model)
    if prediction is None:
        raise ValueError("Forgedit needs an ε- or v-prediction model with a discrete schedule; this MODEL samples with "
                         f"{type(model.get_model_object('model_sampling')).__name__} (a patched sampling: LCM, x0, EDM "
                         "or continuous). Remove the ModelSampling node, or set it to eps or v_prediction.")
    return prediction


def require_sd1_eps(model) -> None:
    """The inversions and P2P edit SD 1.x ε-prediction UNets (StyleDiffusion and null-text inversion use SD 1.4/1.5)."""
    if family(model) != "SD 1.x" or sampled_prediction(model) != "eps":
        raise ValueError("the inversions and P2P / P2Plus editing run on SD 1.x ε-prediction checkpoints (the papers' "
                         f"SD 1.4 / 1.5); this MODEL is {type(model.model.model_config).__name__} sampled by "
                         f"{type(model.get_model_object('model_sampling')).__name__}. Load an SD 1.x checkpoint with "
                         "Load Checkpoint, with no ModelSampling node after it.")


def require_one_image(image) -> None:
    if image.shape[0] != 1:
        raise ValueError(f"image is a batch of {image.shape[0]}; Forgedit learns one image: pick one with ImageFromBatch")


def encode_prompt(clip, text: str, name: str) -> torch.Tensor:
    """CLIP last hidden state (1, 77, C) of a prompt that must fit one 77-token window (Forgedit §3 trains all 77)."""
    tokens = clip.tokenize(text)
    windows = max(len(v) for v in tokens.values())
    if windows > 1:
        raise ValueError(f"{name} is longer than one 77-token window ({windows} windows); Forgedit optimises a single "
                         "77-token embedding, so shorten it to at most 75 tokens.")
    return clip.encode_from_tokens(tokens).float()


def target_embedding(conditioning, result: ForgeditResult, name: str = "target") -> torch.Tensor:
    """The (1, 77, C) embedding of a core CLIPTextEncode CONDITIONING: the target e_t, or the sampler's `negative`."""
    if not conditioning:
        raise ValueError(f"{name} is empty: connect a CLIP Text Encode of the {name} prompt")
    e = conditioning[0][0]
    e_src = result.source_embedding
    if len(conditioning) > 1 or e.shape[0] != 1:
        raise ValueError(f"{name} must be one prompt from CLIP Text Encode, not a combined or batched conditioning")
    if e.shape[-1] != e_src.shape[-1]:
        raise ValueError(f"{name} embedding width {e.shape[-1]} does not match the fine-tuned result ({e_src.shape[-1]}): "
                         f"encode the {name} prompt with the CLIP of the same checkpoint")
    if e.shape[1] != e_src.shape[1]:
        raise ValueError(f"{name} prompt is longer than one 77-token window ({e.shape[1]} tokens of embedding); "
                         f"Forgedit interpolates per token, so shorten the {name} prompt to at most 75 tokens")
    return e.float()


def loaded_unet(model) -> torch.nn.Module:
    """The diffusion model with exactly this MODEL's patches applied, fully loaded on its device."""
    return materialized(model).model.diffusion_model


def unet_fingerprint(unet: torch.nn.Module) -> str:
    return fingerprint(unet.named_parameters())


def require_matching_base(model, result: ForgeditResult) -> None:
    """A result only makes sense on the weights it was fine-tuned from (same checkpoint, same LoRAs applied)."""
    expected = result.metadata.get("base_fingerprint")
    found = unet_fingerprint(loaded_unet(model))
    if expected != found and result.accept_any_base:
        logging.warning("Forgedit: applying a result trained on another base model (fingerprint %s, this MODEL is %s) "
                        "because Forgedit Load has ignore_base_mismatch on", expected, found)
    elif expected != found:
        raise ValueError(f"this fine-tuned result was trained on another base model (fingerprint {expected}, this MODEL "
                         f"is {found}); connect the same checkpoint, with the same LoRAs, that went into Forgedit Fine-tune (or "
                         "turn on ignore_base_mismatch in Forgedit Load to apply it anyway)")


def queue_check(check, *args) -> bool | str:
    """A check as V3 validate_inputs reports it: True, or the message (ComfyUI answers the prompt with HTTP 400)."""
    try:
        check(*args)
    except ValueError as e:
        return str(e)
    return True


def given(value, stand_in):
    """A validate_inputs value: ComfyUI passes None for a linked input (known at run time), so a neutral one stands in."""
    return stand_in if value is None else value


def check_widgets(node_cls, values: dict) -> None:
    """ComfyUI's range and option checks for the given values (None: linked, known at run time). ComfyUI skips them for
    the inputs a validate_inputs names, and 0.3.64 never checks a V3 node's combo options at queue time."""
    for i in node_cls.define_schema().inputs:
        value = values.get(i.id)
        if value is None:
            continue
        if getattr(i, "min", None) is not None and value < i.min:
            raise ValueError(f"{i.id} is {value}, below its minimum {i.min}")
        if getattr(i, "max", None) is not None and value > i.max:
            raise ValueError(f"{i.id} is {value}, above its maximum {i.max}")
        if isinstance(i, io.Combo.Input) and value not in i.options:
            raise ValueError(f"{i.id} {value!r} is not one of: {', '.join(map(str, i.options))}")
