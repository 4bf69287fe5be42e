"""Test bed of the node, server and frontend tests: a real ComfyUI imported as a library, with this pack loaded exactly
as the server loads custom nodes (forgedit_ops itself is loaded standalone by tests/conftest.py)."""
import asyncio
import contextlib
import sys
import types
from pathlib import Path

import pytest

from find_comfyui import PACK, comfyui_path


def _import_comfyui(path: Path):
    sys.path.insert(0, str(path))
    import torch
    from comfy.cli_args import args

    args.cpu = not torch.cuda.is_available()
    import utils.extra_config  # noqa: F401  before `nodes`, which puts comfy/ first on sys.path and shadows `utils`
    import utils.install_util  # noqa: F401
    import utils.json_util  # noqa: F401
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert asyncio.run(nodes.load_custom_node(str(PACK))), "the pack failed to import into ComfyUI (see the log above)"
    return nodes, sys.modules[str(PACK).replace(".", "_x_")]


_COMFYUI = comfyui_path()
if _COMFYUI is None:
    raise pytest.UsageError("No ComfyUI checkout: set COMFYUI_PATH, put this pack in ComfyUI/custom_nodes/, or check out "
                            "ComfyUI 0.3.64 (commit a125cd84) at ~/comfy/ComfyUI. The node tests never skip.")
_NODES, _PACK = _import_comfyui(_COMFYUI)


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's `nodes` module and this pack as ComfyUI loaded it (its nodes and its copy of forgedit_ops)."""
    return types.SimpleNamespace(nodes=_NODES, pack=_PACK, path=_COMFYUI)


def run_node(node_id: str, **inputs):
    """Execute a registered node as execution.py does: a locked class clone with hidden inputs, under inference mode."""
    import nodes
    import torch
    from comfy_api.internal import make_locked_method_func

    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    if hasattr(cls, "VALIDATE_CLASS"):
        cls.VALIDATE_CLASS()
        f = make_locked_method_func(cls, "EXECUTE_NORMALIZED", cls.PREPARE_CLASS_CLONE(hidden_inputs({"UNIQUE_ID": "1"})))
    else:
        f = getattr(cls(), cls.FUNCTION)
    with torch.inference_mode():
        out = f(**inputs)
    return out.result if hasattr(out, "result") else out


def hidden_inputs(values: dict) -> dict:
    """PREPARE_CLASS_CLONE's argument: the hidden values (0.3.64), or V3 data holding them (newer ComfyUI)."""
    from comfy_api.latest._io import HiddenHolder

    return {"hidden_inputs": values} if hasattr(HiddenHolder, "from_v3_data") else values


def tiny_objects(model, clip) -> dict:
    """MODEL / CLIP / VAE built under inference mode like a loader node inside a prompt, the image, the base weights."""
    import torch
    from tiny_models import sample_image, tiny_vae

    with torch.inference_mode():
        objects = {"model": model(), "clip": clip(), "vae": tiny_vae()}
    objects["image"] = sample_image()
    objects["base"] = {k: v.clone() for k, v in objects["model"].model.diffusion_model.state_dict().items()}
    return objects


@pytest.fixture(scope="session")
def tiny(comfy):
    """Tiny SD1.5-layout ε MODEL, CLIP-L-layout CLIP and VAE."""
    from tiny_models import tiny_clip, tiny_model

    return tiny_objects(tiny_model, tiny_clip)


@pytest.fixture(scope="session")
def tiny_v(comfy):
    """Tiny SD 2.x-layout v-prediction MODEL, SD 2.x CLIP (OpenCLIP-H layout, read at the penultimate layer) and VAE."""
    from tiny_models import tiny_sd2_clip, tiny_sd2_model

    return tiny_objects(tiny_sd2_model, tiny_sd2_clip)


FINETUNE = dict(source_prompt="a red disc on a blue gradient", width=64, height=64, samples=8, batch_size=4,
                unet_lr=1e-3, text_lr=1e-2, seed=0, early_stop=False)


@pytest.fixture(scope="session")
def finetuned(tiny):
    """A short fine-tune of the tiny model through the node (large learning rates so the deltas are visible)."""
    result, = run_node("ForgeditFinetune", model=tiny["model"], clip=tiny["clip"], vae=tiny["vae"], image=tiny["image"],
                       **FINETUNE)
    return result


@contextlib.contextmanager
def registered(**classes):
    """Test-only node classes known to ComfyUI while the block runs, as a custom node pack registers them."""
    import nodes

    nodes.NODE_CLASS_MAPPINGS.update(classes)
    try:
        yield
    finally:
        for name in classes:
            nodes.NODE_CLASS_MAPPINGS.pop(name)


@contextlib.contextmanager
def cancel_at(step: int):
    """Press Cancel when a node's progress bar reaches `step` (the server's progress hook, as main.py installs it);
    yields the progress values seen."""
    import comfy.model_management
    import comfy.utils

    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
        if value == step:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    throttle = {k: getattr(comfy.utils, k) for k in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT")
                if hasattr(comfy.utils, k)}  # newer ComfyUI drops progress updates that come too fast
    for k in throttle:
        setattr(comfy.utils, k, 0)
    try:
        yield seen
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
        for k, v in throttle.items():
            setattr(comfy.utils, k, v)


def assert_base_untouched(tiny):
    """The shared base weights, once no patched clone is loaded, are bit-identical to the snapshot."""
    import comfy.model_management
    import torch

    comfy.model_management.unload_all_models()
    now = tiny["model"].model.diffusion_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in tiny["base"].items())
