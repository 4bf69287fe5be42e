"""Through ComfyUI's own PromptExecutor: train once, re-sample cheaply (the graph cache keeps the fine-tune)."""
import inspect

import execution
import pytest
import torch
from conftest import FINETUNE, assert_base_untouched, registered


class MessageLog:
    """What the executor needs of a server: a client id and somewhere to send its messages."""
    client_id = None
    last_node_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def executed(self):
        return {d["node"] for e, d in self.messages if e == "executing" and d["node"] is not None}


@pytest.fixture(scope="module")
def graph_nodes(tiny):
    class TinySD15Loader:
        RETURN_TYPES = ("MODEL", "CLIP", "VAE", "IMAGE")
        FUNCTION = "load"
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def load(self):
            return tiny["model"], tiny["clip"], tiny["vae"], tiny["image"]

    class ImageShape:
        RETURN_TYPES = ()
        FUNCTION = "show"
        OUTPUT_NODE = True
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE",)}}

        def show(self, images):
            return {"ui": {"shape": [list(images.shape)]}}

    with registered(TinySD15Loader=TinySD15Loader, ImageShape=ImageShape):
        yield


def prompt(gammas="0.5, 0.7", strategy="encoderattn", seeds="1", train_seed=0):
    return {
        "1": {"class_type": "TinySD15Loader", "inputs": {}},
        "2": {"class_type": "ForgeditFinetune", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                          "image": ["1", 3], **FINETUNE, "seed": train_seed}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a blue square"}},
        "4": {"class_type": "ForgeditForget", "inputs": {"model": ["1", 0], "result": ["2", 0], "strategy": strategy,
                                                        "degree": 0.0}},
        "5": {"class_type": "ForgeditSampler", "inputs": {
            "model": ["4", 0], "result": ["2", 0], "target": ["3", 0], "vae": ["1", 2], "mode": "vs", "gammas": gammas,
            "alphas": "0.7", "seeds": seeds, "steps": 3, "cfg": 7.5, "sampler_name": "ddim",
            "scheduler": "forgedit_reference", "batch_size": 4}},
        "6": {"class_type": "ImageShape", "inputs": {"images": ["5", 2]}},
    }


def cache_args() -> dict:
    """Newer ComfyUI's PromptExecutor reads cache sizes from cache_args (0.3.64 has no such argument)."""
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return {"cache_args": {"lru": 0, "ram": 0, "ram_inactive": 0}}
    return {}


def test_changing_gamma_strategy_or_seed_does_not_retrain_but_the_training_seed_does(tiny, graph_nodes):
    server = MessageLog()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, **cache_args())

    def run(p, n):
        server.messages.clear()
        executor.execute(p, f"p{n}", {"client_id": "test"}, ["6"])
        assert executor.success, [m for m in server.messages if m[0] == "execution_error"]
        return server.executed()

    assert run(prompt(), 1) == {"1", "2", "3", "4", "5", "6"}
    assert run(prompt(gammas="0.2, 0.9"), 2) == {"5", "6"}
    assert run(prompt(strategy="decoderkv"), 3) == {"4", "5", "6"}
    assert run(prompt(strategy="decoderkv", seeds="7, 8"), 4) == {"5", "6"}
    assert run(prompt(strategy="decoderkv", seeds="7, 8", train_seed=1), 5) == {"2", "4", "5", "6"}
    assert torch.is_inference_mode_enabled() is False
    assert_base_untouched(tiny)
