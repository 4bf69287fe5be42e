"""Print the ComfyUI checkout the tests run against: $COMFYUI_PATH, else the ComfyUI folder enclosing custom_nodes/,
else comfy-cli's default ~/comfy/ComfyUI. Exits 1 with instructions when none exists."""
import importlib.util
import os
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]


def load_module(name: str, filename: str):
    """A file at the pack's root as a module (run.py and workflow_api.py are scripts there, not a package)."""
    spec = importlib.util.spec_from_file_location(name, PACK / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def comfyui_path():
    candidates = [os.environ.get("COMFYUI_PATH")]
    if PACK.parent.name == "custom_nodes":
        candidates.append(PACK.parent.parent)
    candidates.append(Path.home() / "comfy" / "ComfyUI")
    for c in candidates:
        if c and (Path(c) / "comfy" / "model_management.py").is_file():
            return Path(c).resolve()
    return None


if __name__ == "__main__":
    found = comfyui_path()
    if found is None:
        sys.exit("No ComfyUI checkout found: set COMFYUI_PATH, place this pack in ComfyUI/custom_nodes/, "
                 "or check out ComfyUI 0.3.64 (commit a125cd84) at ~/comfy/ComfyUI.")
    print(found)
