"""ComfyUI nodes of the pack: thin V3 wrappers over forgedit_ops."""

from .caption import ForgeditCaption
from .dreambooth import ForgeditDreamBooth, ForgeditTextEncoder
from .edit import ForgeditForget, ForgeditInterpolate
from .finetune import ForgeditFinetune
from .image_encoder import ForgeditImageEncoderLoader
from .imagic import ForgeditImagic
from .inversion import ForgeditDDIMInversion, ForgeditNullTextInversion, ForgeditStyleDiffusionTrain
from .inversion_storage import ForgeditInversionLoad, ForgeditInversionSave, ForgeditStyleDiffusionImport
from .metrics import ForgeditNSLPIPS, ForgeditWordMask
from .p2p_edit import ForgeditP2PEdit
from .sampler import ForgeditSampler
from .score import ForgeditScore
from .storage import ForgeditExportLora, ForgeditLoad, ForgeditSave
from .v3 import ComfyExtension, io


class ForgeditExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ForgeditCaption, ForgeditFinetune, ForgeditImagic, ForgeditDreamBooth, ForgeditTextEncoder,
                ForgeditInterpolate, ForgeditForget, ForgeditSampler, ForgeditSave,
                ForgeditLoad, ForgeditExportLora, ForgeditImageEncoderLoader, ForgeditDDIMInversion,
                ForgeditNullTextInversion, ForgeditStyleDiffusionTrain, ForgeditInversionSave, ForgeditInversionLoad,
                ForgeditStyleDiffusionImport, ForgeditP2PEdit, ForgeditWordMask, ForgeditNSLPIPS,
                ForgeditScore]
