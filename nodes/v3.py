"""The one import point of ComfyUI's V3 node API: `latest` (what core's own nodes use), else the first numbered API."""
try:
    from comfy_api.latest import ComfyExtension, io, ui
except ImportError:  # a ComfyUI whose `latest` moved
    from comfy_api.v0_0_2 import ComfyExtension, io, ui

__all__ = ["ComfyExtension", "io", "ui"]
