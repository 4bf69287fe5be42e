"""Forgedit NS-LPIPS and Forgedit Word Mask: StyleDiffusion's background-preservation metric (Li et al. 2023, §4.1;
eval_metrics/ns_lpips.py) and the word mask it reads (eval_metrics/storemask.py), from a DDIM inversion's cross-attention."""
import os

import comfy.model_management
import comfy.utils
import folder_paths
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..forgedit_ops.lpips import MODES, SIZE, ns_lpips
from ..forgedit_ops.p2p import map_grid
from ..forgedit_ops.stylediffusion import invert_with_maps
from .common import CATEGORY, check_widgets, queue_check
from .inversion_run import frozen_attend, prepare_source
from .training import progress
from .training_inputs import check_size
from .v3 import io, ui

FOLDER = "lpips"
folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
METRICS = f"{CATEGORY}/metrics"
SHIPPED = "lpips_alex_v0.1 (shipped)"
SHIPPED_PATH = os.path.join(os.path.dirname(os.path.realpath(__file__)), "configs", "lpips_alex_v0.1.safetensors")
ALEXNET = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
TRUNK = {**{f"features.{k}.weight": s for k, s in ALEXNET.items()}, **{f"features.{k}.bias": s[:1] for k, s in ALEXNET.items()}}
LIN = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))}
TRUNK_HINT = ("put torchvision's AlexNet weights alexnet-owt-7be5be79.pth (download.pytorch.org/models/"
              "alexnet-owt-7be5be79.pth), or a .safetensors with its features.* keys, into models/lpips")
LIN_HINT = f"put lpips v0.1's alex.pth (lpips/weights/v0.1/alex.pth of the lpips package) into models/lpips, or use {SHIPPED}"
WORD_MODES = ("paper", "plain")


def weight_files() -> list[str]:
    """The weight files ComfyUI lists in every registered models/lpips folder."""
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.lower().endswith((".pth", ".pt", ".safetensors"))]


def require_listed(name, what: str, hint: str, extra: tuple = ()) -> None:
    """The chosen file is one ComfyUI lists in models/lpips (None: linked, known at run time)."""
    if name is not None and name not in (*extra, *weight_files()):
        raise ValueError(f"{what} {name!r} is not in models/lpips: {hint}, then refresh the page")


def load_weights(path: str, expected: dict, hint: str) -> dict:
    """The tensors LPIPS needs from a weight file (fp32); other keys, such as AlexNet's classifier, are ignored."""
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    for key, shape in expected.items():
        if key not in sd or tuple(sd[key].shape) != shape:
            found = "missing" if key not in sd else f"of shape {tuple(sd[key].shape)}"
            raise ValueError(f"{os.path.basename(path)} is not the expected weight file: {key} {shape} is {found}; {hint}")
    return {key: sd[key].float() for key in expected}


def lpips_weights(trunk_file: str, lin_file: str) -> tuple[dict, dict]:
    """AlexNet's features and LPIPS's lins from models/lpips (the lins shipped with the pack by default)."""
    require_listed(trunk_file, "trunk_file", TRUNK_HINT)
    require_listed(lin_file, "lin_file", LIN_HINT, (SHIPPED,))
    lin_path = SHIPPED_PATH if lin_file == SHIPPED else folder_paths.get_full_path_or_raise(FOLDER, lin_file)
    return (load_weights(folder_paths.get_full_path_or_raise(FOLDER, trunk_file), TRUNK, TRUNK_HINT),
            load_weights(lin_path, LIN, LIN_HINT))


def as_mask_batch(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """A MASK as (1 or B, H, W) for `batch` image pairs."""
    mask = mask.reshape(-1, *mask.shape[-2:])
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"background_mask is a batch of {mask.shape[0]}; give one mask or one per image ({batch})")
    return mask


class ForgeditNSLPIPS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditNSLPIPS", display_name="Forgedit NS-LPIPS", category=METRICS,
            description="StyleDiffusion's NS-LPIPS (Li et al. 2023, §4.1): LPIPS (AlexNet, v0.1) between the source and "
                        "the edited image with the soft background mask multiplied into both at 256x256: how much an "
                        "edit changed what it should have kept. Lower is better.",
            inputs=[
                io.Image.Input("image_a", tooltip="The source photo (as inverted: the same crop and size as the edit)."),
                io.Image.Input("image_b", tooltip="The edited image; the same batch size as image_a."),
                io.Mask.Input("background_mask",
                              tooltip="1 = background to keep (Forgedit Word Mask's background); one mask or one per "
                                      "image. Soft: the reference's 0.5 threshold is overwritten."),
                io.Combo.Input("mode", options=list(MODES), default="paper",
                               tooltip="paper: as eval_metrics/ns_lpips.py, 8-bit images in [0, 1] fed to LPIPS as if "
                                       "[-1, 1] (comparable with the paper's numbers). corrected: images mapped to "
                                       "[-1, 1] as LPIPS expects."),
                io.Combo.Input("trunk_file", options=weight_files(),
                               tooltip="torchvision's AlexNet weights alexnet-owt-7be5be79.pth (or a .safetensors with "
                                       "its features.* keys) in models/lpips; the classifier is ignored."),
                io.Combo.Input("lin_file", options=[SHIPPED, *weight_files()], default=SHIPPED, optional=True,
                               tooltip="LPIPS v0.1's linear layers: shipped with the pack (BSD-2-Clause, from the "
                                       "lpips package), or lpips's alex.pth in models/lpips."),
            ],
            outputs=[io.Float.Output(display_name="ns_lpips", tooltip="The mean over the batch, as the script prints.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, mode=None, trunk_file=None, lin_file=None):
        def check():
            check_widgets(cls, {"mode": mode})
            require_listed(trunk_file, "trunk_file", TRUNK_HINT)
            require_listed(lin_file, "lin_file", LIN_HINT, (SHIPPED,))
        return queue_check(check)

    @classmethod
    def execute(cls, image_a, image_b, background_mask, mode, trunk_file, lin_file=SHIPPED) -> io.NodeOutput:
        if image_a.shape[0] != image_b.shape[0]:
            raise ValueError(f"image_a is a batch of {image_a.shape[0]} but image_b of {image_b.shape[0]}: NS-LPIPS "
                             "compares them pairwise")
        device = comfy.model_management.get_torch_device()
        trunk, lin = ({k: v.to(device) for k, v in sd.items()} for sd in lpips_weights(trunk_file, lin_file))
        a, b = (x[..., :3].movedim(-1, 1).float().to(device) for x in (image_a, image_b))
        mask = as_mask_batch(background_mask, a.shape[0]).float().to(device)
        values = ns_lpips(a, b, mask, trunk, lin, mode).cpu()
        each = ", ".join(f"{v:.4f}" for v in values.tolist())
        text = f"NS-LPIPS ({mode}): {values.mean().item():.4f} (mean of {len(values)}: {each})"
        return io.NodeOutput(values.mean().item(), ui=ui.PreviewText(text))


def word_columns(clip, prompt: str, word: str) -> list[int]:
    """The prompt's token columns of `word` (BOS is column 0), its first whole-word occurrence, tokenised as ComfyUI
    encodes the prompt. storemask.py takes column (position among the space-separated words) + 1: the same column when
    every word up to it is one token; for a word of several tokens we average them."""
    hf = clip.tokenizer.clip_l.tokenizer
    ids, target = prompt_ids(clip, prompt), prompt_ids(clip, word)
    word_ends = [t.endswith("</w>") for t in hf.convert_ids_to_tokens(ids)]
    for start in range(len(ids) - len(target) + 1):
        if target and ids[start:start + len(target)] == target and (start == 0 or word_ends[start - 1]):
            return list(range(start + 1, start + 1 + len(target)))
    raise ValueError(f"word {word!r} is not in the prompt; its words are: {', '.join(prompt.split())}")


def prompt_ids(clip, text: str) -> list[int]:
    """The SD1 token ids ComfyUI gives a text, without BOS, EOS and padding."""
    ids = [token for token, _ in clip.tokenize(text)["l"][0]]
    return ids[1:ids.index(clip.tokenizer.clip_l.end_token, 1)]


def word_map(maps: list, columns: list[int], shape: tuple[int, int], paper: bool) -> torch.Tensor:
    """storemask's map: the cond cross maps averaged over steps, layers and heads, the word's columns averaged, (h, w).
    paper: heads 4-7 of SD1's 8 only (its controller keeps attn[h // 2:], meant for an [uncond, cond] batch of 2)."""
    probs = torch.stack([torch.stack(step) for step in maps]).float()  # (steps, layers, 1, heads, N, 77)
    heads = probs.shape[3]
    probs = probs[:, :, :, heads // 2:] if paper else probs
    return probs.mean((0, 1, 2, 3))[:, columns].mean(-1).reshape(shape).cpu()


def paper_masks(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """storemask.py: 255·m/max truncated to 8 bits, PIL's bicubic resize to 256x256; background = 255 − foreground."""
    levels = (255 * m / m.max()).to(torch.uint8).numpy()
    fg = torch.from_numpy(np.array(Image.fromarray(levels).resize((SIZE, SIZE), Image.Resampling.BICUBIC))).float()
    return fg[None] / 255, (255 - fg[None]) / 255


def plain_masks(m: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """m/max as floats, bilinearly resized to the inverted image's size; background = 1 − foreground."""
    fg = F.interpolate((m / m.max())[None, None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return fg, 1 - fg


class ForgeditWordMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditWordMask", display_name="Forgedit Word Mask", category=METRICS,
            description="The foreground of a word and the background NS-LPIPS keeps, as StyleDiffusion's "
                        "eval_metrics/storemask.py: a DDIM inversion (no guidance) under the prompt, its cross-attention "
                        "to the word at the 1/32 level averaged over steps, layers and heads, scaled by its maximum.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x ε-prediction MODEL (Load Checkpoint). It is never modified."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint; encodes the prompt and finds the word."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint; encodes the image."),
                io.Image.Input("image", tooltip="The source photo (a batch of 1), center-cropped to width:height."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The source prompt: what the image shows. At most 75 tokens, no weight syntax."),
                io.String.Input("word", default="", tooltip="A word of the prompt: the object the edit changes (the "
                                                            "reference's first blend word)."),
                io.Combo.Input("mode", options=list(WORD_MODES), default="paper",
                               tooltip="paper: as storemask.py, heads 4-7 only, 8-bit, bicubic 256x256 masks. plain: "
                                       "all heads, float, bilinear to width x height."),
                io.Int.Input("width", default=512, min=64, max=2048, step=8,
                             tooltip="Inversion width (reference: 512). Multiple of 8."),
                io.Int.Input("height", default=512, min=64, max=2048, step=8,
                             tooltip="Inversion height (reference: 512). Multiple of 8."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="DDIM inversion steps (storemask.py: 50)."),
            ],
            outputs=[io.Mask.Output(display_name="foreground", tooltip="The word's attention, 1 at its maximum."),
                     io.Mask.Output(display_name="background", tooltip="1 − foreground: NS-LPIPS's background_mask.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, mode=None, width=None, height=None, steps=None, prompt=None, word=None):
        def check():
            check_widgets(cls, dict(mode=mode, width=width, height=height, steps=steps))
            check_size(width, height)
            for name, text in (("prompt", prompt), ("word", word)):
                if text is not None and not text.strip():
                    raise ValueError(f"{name} is empty")
        return queue_check(check)

    @classmethod
    def execute(cls, model, clip, vae, image, prompt, word, mode, width, height, steps) -> io.NodeOutput:
        settings = dict(source_prompt=prompt, width=width, height=height, crop="center (reference)")
        source = prepare_source(model, clip, vae, image, settings)
        columns = word_columns(clip, prompt, word.strip())
        attend, abar, device, _ = frozen_attend(model)
        _, maps = invert_with_maps(attend, source.z0.to(device), source.context.to(device), abar, steps,
                                   progress(steps, cls.hidden.unique_id))
        if not maps[0]:
            raise ValueError("this UNet has no cross-attention at input blocks 7, 8 or output blocks 3-5 (the maps "
                             "storemask.py averages)")
        shape = map_grid(maps[0][0].shape[-2], source.z0.shape[-2:])
        m = word_map(maps[:-1], columns, shape, mode == "paper")
        masks = paper_masks(m) if mode == "paper" else plain_masks(m, height, width)
        return io.NodeOutput(*masks)
