"""Print the ComfyUI checkout the tests run against: $COMFYUI_PATH, else the ComfyUI folder enclosing custom_nodes/,
else comfy-cli's default ~/comfy/ComfyUI. Exits 1 with instructions when none exists."""
import os
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]


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
