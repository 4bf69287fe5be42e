"""The contract with ComfyUI: every ComfyUI API the pack calls, checked where it is declared, so a ComfyUI that moved
one names it here instead of failing deep inside a training run (the compatibility notes' table, rows A-D)."""
import inspect

import comfy.clip_model
import comfy.clip_vision
import comfy.ldm.modules.attention as attention
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.model_sampling
import comfy.sd1_clip
import comfy.supported_models
import comfy.text_encoders.sd2_clip
import comfy.utils
import folder_paths
import pytest
import torch


def accepts(function, *names):
    parameters = inspect.signature(function).parameters
    return all(n in parameters for n in names)


@pytest.mark.parametrize("function, names", [
    (mm.load_models_gpu, ("models", "force_full_load")),
    (mm.get_free_memory, ("dev",)),
    (mm.should_use_bf16, ("device", "prioritize_performance")),
    (mm.should_use_fp16, ("device", "prioritize_performance")),
    (mm.soft_empty_cache, ()),
    (comfy.utils.ProgressBar.__init__, ("total", "node_id")),
    (comfy.sample.sample_custom, ("model", "noise", "cfg", "sampler", "sigmas", "positive", "negative", "latent_image",
                                  "callback", "disable_pbar", "seed")),
    (comfy.sample.prepare_noise, ("latent_image", "seed")),
    (comfy.samplers.calculate_sigmas, ("model_sampling", "scheduler_name", "steps")),
    (comfy.samplers.sampler_object, ("name",)),
    (comfy.clip_model.CLIPLayer.forward, ("x", "mask", "optimized_attention")),
    (openaimodel.UNetModel.forward, ("x", "timesteps", "context", "transformer_options")),
    (attention.attention_pytorch, ("q", "k", "v", "heads", "mask")),
    (folder_paths.add_model_folder_path, ("folder_name", "full_folder_path")),
    (comfy.clip_vision.convert_to_transformers, ("sd", "prefix")),
    (comfy.clip_vision.ClipVisionModel.__init__, ("json_config",)),
    (comfy.clip_model.CLIPVision.forward, ("pixel_values", "intermediate_output")),
    (mm.load_model_gpu, ("model",)),
    (folder_paths.get_save_image_path, ("filename_prefix", "output_dir")),
    (folder_paths.get_full_path_or_raise, ("folder_name", "filename")),
])
def test_the_functions_we_call_take_our_arguments(function, names):
    assert accepts(function, *names), f"{function.__qualname__}{inspect.signature(function)}"


def test_the_names_we_read_exist():
    assert isinstance(mm.FORCE_FP32, bool) and callable(mm.is_device_cpu)
    assert callable(mm.throw_exception_if_processing_interrupted) and callable(mm.unload_all_models)
    assert "ddim" in comfy.samplers.KSampler.SAMPLERS and "normal" in comfy.samplers.KSampler.SCHEDULERS
    assert hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")


def test_a_diff_patch_adds_its_tensor():
    model = torch.nn.Linear(2, 2)
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    delta = torch.ones(2, 2)
    patcher.add_patches({"weight": (delta,)}, 0.5)
    stored = patcher.patches["weight"][0]
    assert stored[:3] == (0.5, (delta,), 1.0)
    weight = comfy.lora.calculate_weight(patcher.patches["weight"], model.weight.detach().clone(), "weight")
    assert torch.allclose(weight, model.weight + 0.5)


def test_the_attention_override_is_honoured():
    calls = []

    def override(func, *args, **kwargs):
        calls.append(func)
        return attention.attention_pytorch(*args, **kwargs)

    q = torch.randn(1, 4, 8)
    out = attention.optimized_attention(q, q, q, 2, transformer_options={"optimized_attention_override": override})
    assert calls and out.shape == q.shape


def test_the_families_and_predictions_we_accept_are_where_we_read_them():
    """nodes/common.py keys on the exact model config class and on the sampling's calculate_denoised."""
    assert issubclass(comfy.supported_models.SD21UnclipH, comfy.supported_models.SD20)  # hence the exact-class check
    for prediction in (comfy.model_sampling.EPS, comfy.model_sampling.V_PREDICTION):
        assert "calculate_denoised" in vars(prediction)
    assert comfy.supported_models.SD20.unet_extra_config["num_head_channels"] == 64


def test_the_text_tower_states_the_layer_it_reads():
    """DreamBooth-Forgedit reads which layer the embedding comes from (SD 2.x: the penultimate) off the tower."""
    model = comfy.text_encoders.sd2_clip.SD2ClipModel(
        model_options={"clip_h_model_config": {"hidden_size": 8, "intermediate_size": 8, "num_attention_heads": 2,
                                               "num_hidden_layers": 3, "projection_dim": 8}})
    tower = getattr(model, model.clip)
    assert model.clip == "clip_h" and (tower.layer, tower.layer_idx, tower.num_layers) == ("hidden", -2, 3)
    model.set_clip_options({"layer": -3})
    assert (tower.layer, tower.layer_idx) == ("hidden", -3)
    model.reset_clip_options()
    assert (tower.layer, tower.layer_idx) == ("hidden", -2)


def test_clip_options_ignore_what_they_do_not_know():
    assert accepts(comfy.sd1_clip.SDClipModel.set_clip_options, "options")
    source = inspect.getsource(comfy.sd1_clip.SDClipModel.set_clip_options)
    assert "options.get(" in source and "options[" not in source


def test_attention_patches_see_our_options_and_replace_only_their_block():
    """What attention control relies on (design §4): a transformer_options key reaches attn2_patch and the attn2
    replace patch as extra_options, with the block; the patch's value feeds to_v and the context to_k."""
    block = attention.BasicTransformerBlock(8, 2, 4, context_dim=8)
    for p in block.parameters():  # ComfyUI layers skip initialisation
        torch.nn.init.normal_(p)
    seen = []

    def value_patch(n, context, value, extra):
        seen.append(("value", extra["block"], extra["ours"]))
        return n, context, value * 0

    def replace(q, k, v, extra):
        seen.append(("replace", extra["block"], extra["ours"], extra["n_heads"], v.abs().max().item(), k.abs().max().item()))
        return attention.attention_pytorch(q, k, v, extra["n_heads"])

    options = {"block": ("input", 7), "block_index": 0, "ours": "state", "patches": {"attn2_patch": [value_patch]},
               "patches_replace": {"attn2": {("input", 7, 0): replace}}}
    with torch.no_grad():
        block(torch.randn(1, 4, 8), context=torch.randn(1, 3, 8), transformer_options=options)
    assert seen[0] == ("value", ("input", 7), "state") and seen[1][:4] == ("replace", ("input", 7), "state", 2)
    assert block.attn2.to_v.bias is None and seen[1][4] == 0 and seen[1][5] > 0  # v = to_v(0), k from the context
