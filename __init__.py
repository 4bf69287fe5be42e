"""Forgedit for ComfyUI: text-guided editing of real images by per-image fine-tuning."""
from .nodes import ForgeditExtension


async def comfy_entrypoint() -> ForgeditExtension:
    return ForgeditExtension()
