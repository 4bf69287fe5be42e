"""Forgedit for ComfyUI: text-guided editing of real images by per-image fine-tuning."""
from .nodes import ForgeditExtension

# Served by ComfyUI at /extensions/<this folder's name>/; the frontend's node help reads docs/<node id>.md from it.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint() -> ForgeditExtension:
    return ForgeditExtension()
