"""ComfyUI nodes of the pack: thin V3 wrappers over forgedit_ops."""
from comfy_api.latest import ComfyExtension, io

from .edit import ForgeditForget, ForgeditInterpolate
from .finetune import ForgeditFinetune
from .sampler import ForgeditSampler


class ForgeditExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ForgeditFinetune, ForgeditInterpolate, ForgeditForget, ForgeditSampler]
