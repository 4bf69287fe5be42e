"""Forgedit Score: the edit strength suggested from Forgedit Sampler's sweep by text alignment (CLIP score to the target
prompt) and fidelity (CLIP image similarity to the source photo), by a documented rule (forgedit_ops/score.py).

CLIP is built from the full OpenAI CLIP file in models/clip_vision (openai/clip-vit-large-patch14's model.safetensors:
text tower, text_projection, vision tower, visual_projection) with ComfyUI's own classes: comfy.clip_model.CLIPTextModel
for the text tower, comfy.clip_vision.ClipVisionModel for the image tower, comfy.sd1_clip.SDTokenizer for the tokens.
Never the SD1.x checkpoint's projected pooled output: SD1.x files carry no text_projection and ComfyUI leaves that
weight uninitialised (design §1.3)."""
import json
import os
import tempfile

import comfy.clip_model
import comfy.clip_vision
import comfy.model_management
import comfy.ops
import comfy.sd1_clip
import comfy.utils
import folder_paths
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..forgedit_ops.images import stretch_resize
from ..forgedit_ops.score import RULES, SweepData, choose, clip_direction, clip_score, image_similarity, ssim
from .common import CATEGORY, check_widgets, queue_check
from .v3 import io, ui

Sweep = io.Custom("FORGEDIT_SWEEP")
SWEEP_TOOLTIP = "Every cell of the sweep (image, gamma, alpha, seed, mode), for Forgedit Score."
NEEDED = ("Forgedit Score needs the full OpenAI CLIP file with its text tower: put openai/clip-vit-large-patch14's "
          "model.safetensors (ComfyUI-Manager's 'CLIPVision model (openai/clip-vit-large)', "
          "clip-vit-large-patch14.safetensors) into models/clip_vision")
TEXT_KEYS = ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
             "text_model.encoder.layers.0.mlp.fc1.weight", "text_model.final_layer_norm.weight", "text_projection.weight")
VISION_KEYS = ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
               "vision_model.encoder.layers.0.mlp.fc1.weight", "visual_projection.weight")
HEAD_WIDTH = 64  # OpenAI CLIP: heads = width // 64 in both towers
EOS = 49407
CONFIGS = os.path.join(os.path.dirname(os.path.realpath(comfy.clip_vision.__file__)))


def _layers(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def text_config(sd: dict) -> dict:
    with open(os.path.join(CONFIGS, "sd1_clip_config.json")) as f:
        config = json.load(f)
    vocab, width = sd["text_model.embeddings.token_embedding.weight"].shape
    config.update(hidden_size=width, vocab_size=vocab, num_attention_heads=max(1, width // HEAD_WIDTH),
                  intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=_layers(sd, "text_model.encoder.layers."), eos_token_id=EOS,
                  max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0])
    return config


def vision_config(sd: dict) -> dict:
    with open(os.path.join(CONFIGS, "clip_vision_config_vitl.json")) as f:
        config = json.load(f)
    width, _, patch, _ = sd["vision_model.embeddings.patch_embedding.weight"].shape
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    config.update(hidden_size=width, num_attention_heads=max(1, width // HEAD_WIDTH), patch_size=patch,
                  image_size=patch * round((positions - 1) ** 0.5),
                  intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=_layers(sd, "vision_model.encoder.layers."),
                  projection_dim=sd["visual_projection.weight"].shape[0])
    return config


class ScoreClip:
    """CLIP's image and (optionally) text features, fp32, from ComfyUI's classes."""

    def __init__(self, sd: dict, name: str, text: bool = True):
        missing = [k for k in VISION_KEYS if k not in sd]
        if missing:
            raise ValueError(f"{name} is not a CLIP image encoder with a projection ({missing[0]} missing). {NEEDED}")
        self.device = comfy.model_management.text_encoder_device()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "config.json")
            with open(path, "w") as f:
                json.dump(vision_config(sd), f)
            self.vision = comfy.clip_vision.ClipVisionModel(path)
        self.vision.dtype = torch.float32
        self.vision.model.to(torch.float32)
        vision_sd = {k: v for k, v in sd.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
        missing, _ = self.vision.load_sd(vision_sd)
        if missing:
            raise ValueError(f"{name} is an incomplete CLIP image encoder ({missing[0]} missing). {NEEDED}")
        self.text = None
        if not text:
            return
        missing = [k for k in TEXT_KEYS if k not in sd]
        if missing:
            raise ValueError(f"{name} has no CLIP text tower with its projection ({missing[0]} missing), so it can give "
                             "fidelity (CLIP image similarity) only, not text alignment; a vision-only file such as an "
                             f"IP-Adapter image encoder is not enough. {NEEDED}")
        self.text = comfy.clip_model.CLIPTextModel(text_config(sd), torch.float32, "cpu", comfy.ops.manual_cast)
        projection = sd["text_projection.weight"]
        self.text.text_projection = comfy.ops.manual_cast.Linear(projection.shape[1], projection.shape[0], bias=False,
                                                                 dtype=torch.float32)
        text_sd = {k: v for k, v in sd.items() if k.startswith("text_model.") or k == "text_projection.weight"}
        missing, _ = self.text.load_state_dict(text_sd, strict=False)
        if missing:
            raise ValueError(f"{name} is an incomplete CLIP text tower ({missing[0]} missing). {NEEDED}")
        self.text.eval()
        self.tokenizer = comfy.sd1_clip.SDTokenizer()

    def tokens(self, texts: list[str]) -> torch.Tensor:
        """Each text's first 77-token window as ComfyUI's CLIP tokenizer pads it (longer prompts are truncated)."""
        return torch.tensor([[t[0] for t in self.tokenizer.tokenize_with_weights(s)[0]] for s in texts])

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """CLIP text features: text_projection of the final-layer-norm state at the first end token."""
        model = self.text.to(self.device)
        try:
            out = model(input_tokens=self.tokens(texts).to(self.device), dtype=torch.float32)
            return out[2].float().cpu()
        finally:
            model.to("cpu")

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        model = self.vision.model.to(self.device)
        try:
            return model(pixel_values=pixels.to(self.device, torch.float32), intermediate_output=None)[2].float().cpu()
        finally:
            model.to("cpu")

    def encode_image(self, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """CLIP image features of (N, H, W, 3) images through core's clip_preprocess (resize, center crop, 8 bit)."""
        out = []
        for i in range(0, images.shape[0], batch):
            pixels = comfy.clip_vision.clip_preprocess(images[i:i + batch, ..., :3].float(), size=self.vision.image_size,
                                                      mean=self.vision.image_mean, std=self.vision.image_std, crop=True)
            out.append(self.encode_pixels(pixels))
        return torch.cat(out)


def load_score_clip(path: str, text: bool = True) -> ScoreClip:
    """An HF-layout CLIP file as ScoreClip; a file without a text tower is refused by name unless text=False."""
    return ScoreClip(comfy.utils.load_torch_file(path, safe_load=True), os.path.basename(path), text)


def require_sweep(sweep) -> None:
    if not isinstance(sweep, SweepData) or sweep.images.shape[0] != len(sweep.gammas):
        raise ValueError("sweep must come from the sweep output of Forgedit Sampler")


def read_inputs(target_prompt: str, clip_name, rule: str) -> None:
    if not target_prompt.strip():
        raise ValueError("target_prompt is empty: connect the target prompt's text (the same as its CLIP Text Encode)")
    if rule not in RULES:
        raise ValueError(f"rule {rule!r} is not one of: {', '.join(RULES)}")
    if clip_name is not None and clip_name not in folder_paths.get_filename_list("clip_vision"):
        raise ValueError(f"clip_name {clip_name!r} is not in models/clip_vision. {NEEDED}, then refresh the page")


def metrics(clip: ScoreClip, sweep: SweepData, source_image, target_prompt: str, source_prompt: str) -> dict:
    """Per cell: CLIP score to the target, CLIP-I to the source, CLIP direction (with a source prompt) and SSIM."""
    images = sweep.images
    texts = [target_prompt] + ([source_prompt] if source_prompt.strip() else [])
    text = clip.encode_text(texts)
    feats = clip.encode_image(images)
    source = clip.encode_image(source_image[:1])
    h, w = images.shape[1:3]
    photo = stretch_resize(source_image[:1, ..., :3], w, h)
    out = {"T": clip_score(feats, text[:1]), "F": image_similarity(feats, source),
           "SSIM": ssim(images[..., :3].cpu(), photo.cpu())}
    if len(texts) == 2:
        out["D"] = clip_direction(feats, source, text[:1], text[1:])
    return out


COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def plot(choice, width: int = 960, height: int = 400) -> torch.Tensor:
    """Text alignment (left) and fidelity (right) against γ, a line per α, seed mean ± spread, the pick ringed in red."""
    font = ImageFont.load_default(size=13)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    gammas = [g for c in choice.curves for g in c.gammas]
    g0, g1 = min(gammas), max(gammas)
    g1 = g1 if g1 > g0 else g0 + 1.0
    for panel, (key, spread, title) in enumerate((("t", "t_spread", "text alignment (CLIP score)"),
                                                  ("f", "f_spread", "fidelity (CLIP image similarity)"))):
        left, top, w, h = panel * width // 2 + 60, 30, width // 2 - 80, height - 80
        lows = [m - s for c in choice.curves for m, s in zip(getattr(c, key), getattr(c, spread))]
        highs = [m + s for c in choice.curves for m, s in zip(getattr(c, key), getattr(c, spread))]
        v0, v1 = min(lows), max(highs)
        v1 = v1 if v1 > v0 else v0 + 1.0
        x = lambda g: left + (g - g0) / (g1 - g0) * w  # noqa: E731
        y = lambda v: top + h - (v - v0) / (v1 - v0) * h  # noqa: E731
        draw.rectangle((left, top, left + w, top + h), outline="black")
        draw.text((left, 8), title, fill="black", font=font)
        for v in (v0, v1):
            draw.text((left - 6, y(v)), f"{v:.3g}", fill="black", font=font, anchor="rm")
        for g in sorted(set(gammas)):
            draw.text((x(g), top + h + 6), f"{g:g}", fill="black", font=font, anchor="mt")
        draw.text((left + w // 2, top + h + 24), "gamma" if choice.alpha is None else "beta", fill="black", font=font,
                  anchor="mt")
        for k, c in enumerate(choice.curves):
            colour = COLOURS[k % len(COLOURS)]
            means, spreads = getattr(c, key), getattr(c, spread)
            points = [(x(g), y(m)) for g, m in zip(c.gammas, means)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for (px, _), m, s in zip(points, means, spreads):
                draw.line((px, y(m - s), px, y(m + s)), fill=colour, width=1)
            for px, py in points:
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
            if c.alpha is not None:
                draw.text((left + w - 70, top + 8 + 16 * k), f"alpha {c.alpha:g}", fill=colour, font=font)
        c = choice.curves[choice.curve]
        px, py = x(c.gammas[choice.index]), y(getattr(c, key)[choice.index])
        draw.ellipse((px - 8, py - 8, px + 8, py + 8), outline="red", width=3)
    return torch.from_numpy(np.array(canvas)).float().div(255).unsqueeze(0)


def table(choice, cells: dict, seeds: list) -> str:
    header = ["alpha", "gamma", "seeds", "clip_score", "clip_score_spread", "clip_i", "clip_i_spread", "ssim"]
    if "D" in cells:
        header.append("direction")
    rows = ["\t".join(header + ["pick"])]
    for k, c in enumerate(choice.curves):
        for i, g in enumerate(c.gammas):
            idx = c.cells[i]
            row = ["-" if c.alpha is None else f"{c.alpha:g}", f"{g:g}", ",".join(str(seeds[j]) for j in idx),
                   f"{c.t[i]:.4f}", f"{c.t_spread[i]:.4f}", f"{c.f[i]:.4f}", f"{c.f_spread[i]:.4f}",
                   f"{float(cells['SSIM'][idx].mean()):.4f}"]
            if "D" in cells:
                row.append(f"{float(cells['D'][idx].mean()):.4f}")
            rows.append("\t".join(row + ["*" if (k, i) == (choice.curve, choice.index) else ""]))
    return "\n".join(rows)


class ForgeditScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditScore",
            display_name="Forgedit Score",
            category=CATEGORY,
            description="Suggests the edit strength gamma (and alpha in vp) from Forgedit Sampler's sweep: text alignment "
                        "(CLIP score to the target prompt) and fidelity (CLIP image similarity to the source photo), "
                        "averaged over seeds, picked by a documented rule. A suggestion, not validated against people's "
                        "choices: the grid stays the primary view.",
            inputs=[
                Sweep.Input("sweep", tooltip="The sweep output of Forgedit Sampler."),
                io.Image.Input("source_image", tooltip="The source photo (the image Forgedit Fine-tune learned)."),
                io.String.Input("target_prompt", multiline=True, default="",
                                tooltip="The target prompt's text (connect the same text as its CLIP Text Encode)."),
                io.Combo.Input("clip_name", options=folder_paths.get_filename_list("clip_vision"),
                               tooltip="The full OpenAI CLIP file with its text tower (clip-vit-large-patch14.safetensors, "
                                       "openai/clip-vit-large-patch14's model.safetensors) in models/clip_vision."),
                io.Combo.Input("rule", options=list(RULES), default="threshold",
                               tooltip="threshold: the smallest gamma whose alignment reaches tau of its rise; knee: "
                                       "Kneedle on (fidelity, alignment); min fidelity: the best alignment with fidelity "
                                       ">= min_fidelity. Ties go to the smaller gamma."),
                io.Float.Input("tau", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="threshold: the fraction of the alignment's rise (from the smallest gamma to the "
                                       "maximum) that counts as edited."),
                io.Float.Input("min_fidelity", default=0.85, min=-1.0, max=1.0, step=0.01,
                               tooltip="min fidelity: the least CLIP image similarity to the source that is kept."),
                io.Float.Input("min_rise", default=0.5, min=0.0, max=100.0, step=0.1,
                               tooltip="threshold: if the CLIP score never rises more than this above its value at the "
                                       "smallest gamma, 'no edit detected' is reported and the largest gamma returned."),
                io.String.Input("source_prompt", multiline=True, default="", optional=True,
                                tooltip="Optional source caption, for CLIP direction (reported, not used by the rules)."),
            ],
            outputs=[io.Float.Output(display_name="gamma", tooltip="The suggested gamma (beta in vp), for Forgedit "
                                                                    "Interpolate."),
                     io.Float.Output(display_name="alpha", tooltip="The suggested alpha (vp); 0 in vs, where alpha is "
                                                                    "not used."),
                     io.Image.Output(display_name="image", tooltip="The picked setting's image at the seed whose "
                                                                    "alignment is nearest the seed mean."),
                     io.Image.Output(display_name="plot", tooltip="Alignment and fidelity against gamma per alpha, "
                                                                   "seed mean and spread, the pick ringed."),
                     io.String.Output(display_name="table", tooltip="Every setting's metrics, tab-separated.")],
        )

    @classmethod
    def validate_inputs(cls, target_prompt=None, clip_name=None, rule=None) -> bool | str:
        return queue_check(read_inputs, target_prompt if target_prompt is not None else "linked", clip_name,
                           rule if rule is not None else "threshold")

    @classmethod
    def execute(cls, sweep, source_image, target_prompt, clip_name, rule, tau, min_fidelity, min_rise,
                source_prompt="") -> io.NodeOutput:
        read_inputs(target_prompt, None, rule)
        check_widgets(cls, {"tau": tau, "min_fidelity": min_fidelity, "min_rise": min_rise})
        require_sweep(sweep)
        clip = load_score_clip(folder_paths.get_full_path_or_raise("clip_vision", clip_name))
        cells = metrics(clip, sweep, source_image, target_prompt, source_prompt or "")
        parameter = {"threshold": tau, "min fidelity": min_fidelity}.get(rule, 0.0)
        t, f = cells["T"].tolist(), cells["F"].tolist()
        choice = choose(rule, sweep.gammas, t, f, sweep.alphas, parameter, min_rise)
        curve = choice.curves[choice.curve]
        idx = choice.cells
        mean = curve.t[choice.index]
        best = min(idx, key=lambda j: (abs(t[j] - mean), j))
        setting = f"gamma {choice.gamma:g}" if choice.alpha is None else f"beta {choice.gamma:g}, alpha {choice.alpha:g}"
        line = (f"Forgedit Score ({rule}): {setting}; CLIP score {mean:.2f} ± {curve.t_spread[choice.index]:.2f}, "
                f"CLIP-I {curve.f[choice.index]:.3f} over {len(idx)} seed(s)" +
                (f"; {choice.flag}" if choice.flag else "") + ". A suggestion from a documented rule, not validated "
                "against people's choices.")
        text = line + "\n" + table(choice, cells, sweep.seeds)
        return io.NodeOutput(float(choice.gamma), float(choice.alpha or 0.0), sweep.images[best:best + 1],
                             plot(choice), text, ui=ui.PreviewText(line))
