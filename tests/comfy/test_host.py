"""How the training nodes meet today's ComfyUI: DynamicVRAM patchers (train from the non-dynamic delegate, never copy
runtime handles), the training device, free memory, --force-fp32, and models that lack what Forgedit trains."""
import ctypes

import comfy.model_management as model_management
import comfy.model_patcher as model_patcher
import comfy.supported_models as supported_models
import pytest
import torch
from conftest import FINETUNE, run_node
from test_dreambooth import DREAMBOOTH
from test_imagic import IMAGIC
from tiny_models import tiny_clip, tiny_model


def with_runtime_handles(module: torch.nn.Module, garbage: bool = False) -> torch.nn.Module:
    """Give every layer what DynamicVRAM hangs on modules: a handle holding a ctypes callback (deepcopy refuses it) and
    a per-op patch function; `garbage` also zeroes the weights, as a dynamic module never holds the patched ones."""
    callback = ctypes.CFUNCTYPE(None)(lambda: None)
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m._v = (callback, 0, m.weight.numel())
            m.weight_lowvram_function = lambda w: w
            if garbage:
                with torch.no_grad():
                    m.weight.zero_()
    return module


class DynamicPatcher(model_patcher.ModelPatcher):
    """A patcher that reports itself dynamic, as ComfyUI's ModelPatcherDynamic does, and hands out a delegate."""

    def is_dynamic(self):
        return True

    def get_non_dynamic_delegate(self):
        self.delegations += 1
        return self.delegate


def dynamic(patcher, delegate, garbage=True):
    d = DynamicPatcher(with_runtime_handles(patcher.model, garbage), patcher.load_device, patcher.offload_device)
    d.delegate, d.delegations = delegate, 0
    with_runtime_handles(delegate.model)
    return d


@pytest.fixture
def dynamic_models(comfy):
    with torch.inference_mode():
        model = dynamic(tiny_model(), tiny_model())
        clip = tiny_clip()
        clip.patcher = dynamic(clip.patcher, tiny_clip().patcher, garbage=False)  # it still encodes the prompts
        clip.cond_stage_model = clip.patcher.model
    return model, clip


@pytest.mark.parametrize("node, settings", [("ForgeditFinetune", FINETUNE), ("ForgeditImagic", IMAGIC),
                                            ("ForgeditDreamBooth", DREAMBOOTH)])
def test_a_dynamic_model_trains_from_its_delegate(tiny, finetuned, dynamic_models, node, settings):
    model, clip = dynamic_models
    out = run_node(node, model=model, clip=clip, vae=tiny["vae"], image=tiny["image"], **settings)
    result = out[0]
    assert model.delegations >= 1 and result.metadata["base_fingerprint"] == finetuned.metadata["base_fingerprint"]
    assert all(torch.isfinite(d).all() for d in result.deltas.values())
    if node == "ForgeditFinetune":
        assert all(torch.equal(result.deltas[k], d) for k, d in finetuned.deltas.items())
    if node == "ForgeditDreamBooth":
        assert clip.patcher.delegations >= 1 and result.text_deltas
    model_management.unload_all_models()


def test_training_copies_leave_runtime_handles_behind(comfy):
    from forgedit_ops.finetune import trainable_copy
    from forgedit_ops.forgetting import is_trained

    with torch.inference_mode():
        unet = with_runtime_handles(tiny_model().model.diffusion_model)
    with pytest.raises(ValueError, match="ctypes"):
        trainable_copy(unet, is_trained, torch.device("cpu"))
    student, params = trainable_copy(unet, is_trained, torch.device("cpu"), drop=comfy.pack.nodes.host.RUNTIME_HANDLES)
    assert params and not any(hasattr(m, "_v") or hasattr(m, "weight_lowvram_function") for m in student.modules())
    assert all(hasattr(m, "_v") for m in unet.modules() if isinstance(m, torch.nn.Linear))


def test_a_model_without_a_delegate_is_a_clear_error(tiny, comfy):
    with torch.inference_mode():
        model = DynamicPatcher(tiny_model().model, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="DynamicVRAM.*Load Checkpoint"):
        run_node("ForgeditFinetune", model=model, clip=tiny["clip"], vae=tiny["vae"], image=tiny["image"], **FINETUNE)


def test_force_fp32_makes_every_preset_fp32(tiny, comfy, monkeypatch):
    host = comfy.pack.nodes.host
    assert host.low_precision(torch.device("cpu")) in ("bf16", "fp32")
    monkeypatch.setattr(model_management, "FORCE_FP32", True)
    assert host.low_precision(torch.device("cpu")) == "fp32"
    result, = run_node("ForgeditFinetune", model=tiny["model"], clip=tiny["clip"], vae=tiny["vae"], image=tiny["image"],
                       **{**FINETUNE, "precision": "low memory"})
    assert result.metadata["precision"] == "fp32"


def test_auto_falls_back_to_low_memory_when_the_estimate_does_not_fit(tiny, comfy, monkeypatch):
    training = comfy.pack.nodes.training
    size = training.run_size(tiny["model"], training.METHODS["forgedit"], 4, 64, 64)
    assert size.trained + size.frozen == sum(p.numel() for p in tiny["model"].model.diffusion_model.parameters())
    fast = training.training_options("auto", tiny["model"], size)
    monkeypatch.setattr(training, "free_memory", lambda patcher, device: 1024)
    low = training.training_options("auto", tiny["model"], size)
    assert not fast.get("checkpointing") and low["checkpointing"] and low["moments"] == "8-bit"


def test_a_unet_without_forgedits_blocks_is_refused_before_training(tiny, comfy):
    from tiny_models import sd15_unet_config

    config = {**sd15_unet_config(), "channel_mult": [1], "num_res_blocks": [1], "transformer_depth": [1, 1],
              "transformer_depth_output": [1, 1]}
    with torch.inference_mode():
        sd = supported_models.SD15(config)
        sd.set_inference_dtype(torch.float32, None)
        one_level = model_patcher.ModelPatcher(sd.get_model({}, "", device=torch.device("cpu")),
                                                     torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="lacks input_blocks.4.*Forgedit §3"):
        run_node("ForgeditFinetune", model=one_level, clip=tiny["clip"], vae=tiny["vae"], image=tiny["image"], **FINETUNE)


def test_results_show_their_size_to_comfyuis_ram_cache(finetuned):
    tensors = finetuned._comfy_cache_tensors()
    assert len(tensors) == len(finetuned.deltas) + 2 and all(t.device.type == "cpu" for t in tensors)


def test_sdpa_goes_through_comfyuis_own_setter_where_it_has_one(tiny, comfy):
    class NewerPatcher(model_patcher.ModelPatcher):
        def set_model_optimized_attention(self, optimized_attention):
            self.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = (
                lambda _, *args, **kwargs: optimized_attention(*args, **kwargs))
            self.chosen = optimized_attention

    newer = NewerPatcher(tiny["model"].model, torch.device("cpu"), torch.device("cpu"))
    options = comfy.pack.nodes.host.sdpa_transformer_options(newer)
    assert "optimized_attention_override" in options
    assert "optimized_attention_override" not in newer.model_options.get("transformer_options", {})
    fast = comfy.pack.nodes.host.with_sdpa(newer)
    assert fast.chosen is comfy.pack.nodes.host.attention.attention_pytorch
