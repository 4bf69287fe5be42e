"""forgedit_ops imported standalone, as the package it is (it never imports comfy): what the tests in ops/ need, with
torch and nothing else."""
import importlib.util
import sys

from find_comfyui import PACK


def _load_ops():
    spec = importlib.util.spec_from_file_location("forgedit_ops", PACK / "forgedit_ops" / "__init__.py",
                                                  submodule_search_locations=[str(PACK / "forgedit_ops")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["forgedit_ops"] = module
    spec.loader.exec_module(module)


_load_ops()
