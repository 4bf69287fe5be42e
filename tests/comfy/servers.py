"""Real ComfyUI servers on CPU for the server tests (test_workflows.py, test_runner.py): a throwaway base directory with
a generated random SD1.5-layout checkpoint, a tiny random BLIP, a tiny random ViT-B/16-layout image encoder and random
AlexNet features for LPIPS, started by run.py's own start_comfyui (which hands ComfyUI this pack through an extra
custom_nodes folder). Test files import the fixtures they use from here."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from find_comfyui import PACK, comfyui_path, load_module
from PIL import Image, ImageDraw
from test_caption import blip_root  # noqa: F401  the tiny random BLIP folder (a session fixture)

WORKFLOWS = PACK / "workflows"
NAMES = ["forgedit_vanilla", "forgedit_reedit_saved", "forgedit_single_gamma_ksampler", "imagic", "forgedit_imagic",
         "dreambooth_forgedit", "stylediffusion_edit", "nulltext_p2p", "stylediffusion_reedit_saved", "ns_lpips",
         "forgedit_score"]
CHECKPOINT = "shallow_sd15.safetensors"
SD2_CHECKPOINT = "shallow_sd2v.safetensors"
CLIP_VISION = "tiny-vit-b16.safetensors"
ALEXNET = "random-alexnet.safetensors"
SCORE_CLIP = "tiny-clip-l14.safetensors"  # Forgedit Score's CLIP: text and image towers, both projections
SERVER_ARGS = ["--cpu", "--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
TRAIN = ["--set", "ForgeditFinetune.samples=4", "--set", "ForgeditFinetune.batch_size=2"]
SAMPLE = ["--set", "ForgeditSampler.steps=2", "--set", "ForgeditSampler.gammas=0.6, 0.8", "--set",
          "ForgeditSampler.seeds=0", "--set", "ForgeditSampler.batch_size=2"]


def small_inversion(node: str) -> list[str]:
    """An inversion node at 64 x 64, 4 DDIM steps, at most 2 optimiser steps per DDIM step (the edit takes its size
    and steps)."""
    return [a for k in ("width=64", "height=64", "steps=4", "inner_steps=2") for a in ("--set", f"{node}.{k}")]


SMALL = {  # CPU-sized settings for each workflow: 64 x 64, 2 training steps, 2 sampling steps
    "forgedit_vanilla": [*TRAIN, "--set", "ForgeditFinetune.width=64", "--set", "ForgeditFinetune.height=64",
                         "--set", "ForgeditCaption.blip_model=tiny-blip", "--set", "ForgeditSampler.steps=2",
                         "--set", "ForgeditSampler.gammas=0.5, 0.7", "--set", "ForgeditSampler.seeds=0, 1",
                         "--set", "ForgeditSampler.batch_size=2"],
    "forgedit_reedit_saved": ["--set", "ForgeditSampler.steps=2", "--set", "ForgeditSampler.gammas=0.4:0.8:0.2",
                              "--set", "ForgeditSampler.seeds=3", "--set", "Forgedit Sampler.batch_size=2"],
    "forgedit_single_gamma_ksampler": [*TRAIN, "--set", "width.value=64", "--set", "height.value=64",
                                       "--set", "KSampler.steps=2"],
    "imagic": ["--set", "ForgeditImagic.text_steps=2", "--set", "ForgeditImagic.unet_steps=2", "--set",
               "ForgeditImagic.width=64", "--set", "ForgeditImagic.height=64", *SAMPLE],
    "forgedit_imagic": ["--set", "ForgeditImagic.text_steps=2", "--set", "ForgeditImagic.unet_steps=2", "--set",
                        "ForgeditImagic.width=64", "--set", "ForgeditImagic.height=64", *SAMPLE],
    "dreambooth_forgedit": ["--set", "ForgeditDreamBooth.samples=4", "--set", "ForgeditDreamBooth.batch_size=2",
                            "--set", "ForgeditDreamBooth.width=64", "--set", "ForgeditDreamBooth.height=64",
                            "--set", "ForgeditCaption.blip_model=tiny-blip", *SAMPLE],
    "stylediffusion_edit": [*small_inversion("ForgeditStyleDiffusionTrain"),
                            "--set", f"ForgeditImageEncoderLoader.clip_name={CLIP_VISION}"],
    "nulltext_p2p": small_inversion("ForgeditNullTextInversion"),
    "stylediffusion_reedit_saved": [],
    "ns_lpips": ["--set", "ForgeditWordMask.width=64", "--set", "ForgeditWordMask.height=64", "--set",
                 "ForgeditWordMask.steps=2", "--set", f"ForgeditNSLPIPS.trunk_file={ALEXNET}"],
    "forgedit_score": [*TRAIN, "--set", "width.value=64", "--set", "height.value=64", "--set",
                       "ForgeditCaption.blip_model=tiny-blip", "--set", "ForgeditSampler.steps=2", "--set",
                       "ForgeditSampler.gammas=0.4, 0.6, 0.8", "--set", "ForgeditSampler.seeds=0, 1", "--set",
                       "ForgeditSampler.batch_size=2", "--set", f"ForgeditScore.clip_name={SCORE_CLIP}",
                       "--set", "KSampler.steps=2"],
}
IMAGES = {"forgedit_vanilla": 1 + 4, "forgedit_reedit_saved": 1 + 3, "forgedit_single_gamma_ksampler": 1,
          "stylediffusion_edit": 1 + 2, "nulltext_p2p": 1, "stylediffusion_reedit_saved": 1,  # grids, each image
          "ns_lpips": 0, "forgedit_score": 3}  # forgedit_score: the grid, the score plot, the KSampler image


run = load_module("forgedit_run", "run.py")


def prepare_base(base: Path, models: dict[str, Path]) -> Path:
    """A ComfyUI base directory (--base-directory) holding the test models as links, and settings that skip the
    frontend's first-run tutorial. No custom_nodes: run.py's start_comfyui adds this pack."""
    for folder in ("custom_nodes", "models/checkpoints", "models/blip", "models/forgedit", "models/clip_vision",
                   "models/stylediffusion", "models/lpips", "input", "output"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for relative, target in models.items():
        (base / relative).symlink_to(target)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}))
    return base


class Server:
    """`python main.py --cpu` in a throwaway base directory, started as run.py starts a local ComfyUI."""

    def __init__(self, base: Path, models: dict[str, Path]):
        self.base = prepare_base(base, models)
        self.process = run.start_comfyui(comfyui_path(), [*SERVER_ARGS, "--base-directory", str(base)], base / "run")
        self.url = self.process.url

    def wait(self, timeout: float = 180) -> None:
        """Until /object_info answers with the pack's nodes (10-15 s on one core)."""
        try:
            run.wait_ready(self.process, timeout)
        except run.RunError as e:
            raise AssertionError(str(e)) from None

    def get(self, path: str):
        return run.get_json(self.url, path)

    def post(self, path: str, body: dict):
        return run.post_json(self.url, path, body)

    def log_tail(self, lines: int = 40) -> str:
        return run.log_tail(self.process.log, lines)

    def stop(self) -> None:
        run.stop_process(self.process.pid, self.process)


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll condition() until it is truthy (returned) or timeout seconds pass (AssertionError naming what)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture(scope="session")
def checkpoint(comfy, tmp_path_factory) -> Path:
    """The random shallow SD1.5 checkpoint file, written once (0.48 GB)."""
    from checkpoint_file import write_shallow_sd15

    path = tmp_path_factory.mktemp("checkpoints") / CHECKPOINT
    write_shallow_sd15(path)
    return path


@pytest.fixture(scope="session")
def sd2_checkpoint(comfy, tmp_path_factory) -> Path:
    """The random shallow SD 2.x v-prediction checkpoint file, written once (0.95 GB)."""
    from checkpoint_file import write_shallow_sd2v

    path = tmp_path_factory.mktemp("checkpoints") / SD2_CHECKPOINT
    write_shallow_sd2v(path)
    return path


@pytest.fixture(scope="session")
def clip_vision(tmp_path_factory) -> Path:
    """A random image encoder in openai/clip-vit-base-patch16's HF layout (patch 16, 224 px, 197 tokens), one layer,
    768 wide: StyleDiffusion's mapping reads E(x) as wide as the checkpoint's text embedding (CLIP-L, 768)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=768, intermediate_size=64, num_attention_heads=12,
                                           num_hidden_layers=1, patch_size=16, image_size=224, hidden_act="quick_gelu")
    weights = transformers.CLIPVisionModel(config).state_dict()
    sd = {"vision_model." + k.removeprefix("vision_model."): v.contiguous() for k, v in weights.items()}
    path = tmp_path_factory.mktemp("clip_vision") / CLIP_VISION
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="session")
def score_clip(tmp_path_factory) -> Path:
    """A random CLIP in openai/clip-vit-large-patch14's HF layout with both towers and both projections (the file
    Forgedit Score reads), two layers 32 wide, 28 px images in 14 px patches. Not among `models`: a second file in
    models/clip_vision would change Forgedit Score's clip_name list in the object_info snapshot; the test that needs it
    links it into its server with add_model."""
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=69, num_attention_heads=1, num_hidden_layers=2, vocab_size=49408,
                max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406, pad_token_id=49407,
                hidden_act="quick_gelu")
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=1, num_hidden_layers=2, image_size=28,
                  patch_size=14, hidden_act="quick_gelu")
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if "position_ids" not in k}
    path = tmp_path_factory.mktemp("score_clip") / SCORE_CLIP
    save_file(sd, str(path))
    return path


def add_model(server: "Server", relative: str, target: Path) -> None:
    """Link one more model file into a running server's base directory (ComfyUI rescans a folder whose time changed)."""
    link = server.base / relative
    if not link.exists():
        link.symlink_to(target)


@pytest.fixture(scope="session")
def alexnet(tmp_path_factory) -> Path:
    """Random weights of the AlexNet features LPIPS reads (torchvision's `features.*` keys and shapes, 2.5 M)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    sd = {}
    for layer, shape in shapes.items():
        fan_in = shape[1] * shape[2] * shape[3]
        sd[f"features.{layer}.weight"] = torch.randn(shape, generator=generator) * (2 / fan_in) ** 0.5
        sd[f"features.{layer}.bias"] = 0.01 * torch.randn(shape[0], generator=generator)
    path = tmp_path_factory.mktemp("lpips") / ALEXNET
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="session")
def models(checkpoint, blip_root, clip_vision, alexnet) -> dict[str, Path]:  # noqa: F811
    return {f"models/checkpoints/{CHECKPOINT}": checkpoint, "models/blip/tiny-blip": blip_root / "tiny-blip",
            f"models/clip_vision/{CLIP_VISION}": clip_vision, f"models/lpips/{ALEXNET}": alexnet}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """One ComfyUI server shared by the tests of a module."""
    s = Server(tmp_path_factory.mktemp("comfyui"), models)
    try:
        s.wait()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> list[Path]:
    """Two small 'photos': a red disc and a yellow square on gradients."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, (shape, colour) in enumerate((("ellipse", (220, 40, 40)), ("rectangle", (230, 200, 40)))):
        ramp = np.linspace(0, 1, 96)[None, :, None] * np.array([40, 90, 200]) + np.linspace(0, 60, 72)[:, None, None]
        image = Image.fromarray(ramp.clip(0, 255).astype(np.uint8))
        getattr(ImageDraw.Draw(image), shape)((24, 14, 70, 58), fill=colour)
        paths.append(folder / f"photo{i}.png")
        image.save(paths[-1])
    return paths


def run_cli(workflow: str, *args, servers=(), cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    """python run.py workflows/<workflow>.json ... as a user types it."""
    command = [sys.executable, str(PACK / "run.py"), str(WORKFLOWS / f"{workflow}.json"), "--checkpoint", CHECKPOINT]
    for url in servers:
        command += ["--server", url]
    return subprocess.run(command + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def run_small(server, workflow: str, out: Path, *args, image=None, target="a sitting dog"):
    extra = ["--image", image] if image else []
    return run_cli(workflow, *extra, "--target", target, "--out", out, *SMALL[workflow], *args, servers=[server.url])


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))
