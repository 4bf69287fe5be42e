"""Let the registry's CUDA-only torchvision import on a CPU-only torch.

torchvision 0.28 registers meta kernels for `torchvision::nms`/`qnms` at import time; when its CUDA `_C.so` cannot load,
those operators do not exist and the import fails. Defining the two schemas first is enough for what ComfyUI core uses of
torchvision (transforms and model definitions). `.ci/setup` installs this as a `.pth` hook in CPU-only environments.
"""
import importlib.abc
import sys


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            if torch.version.cuda is None:
                global _lib
                _lib = torch.library.Library("torchvision", "FRAGMENT")
                for op in ("nms", "qnms"):
                    _lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None


sys.meta_path.insert(0, _DefineTorchvisionOps())
