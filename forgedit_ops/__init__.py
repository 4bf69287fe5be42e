"""Forgedit math on plain tensors and modules; never imports ComfyUI."""
