"""Queue-time checks: ComfyUI's own validate_prompt calls the nodes' validate_inputs, so a bad value is an HTTP 400
naming the node and the input before any model loads."""
import asyncio

import execution
import nodes
import pytest
from conftest import registered


class Sources:
    """Stands in for the loaders and Forgedit Fine-tune: validation never runs a node."""
    RETURN_TYPES = ("MODEL", "VAE", "FORGEDIT_RESULT", "CONDITIONING", "CLIP", "IMAGE", "CLIP_VISION", "P2P_INVERSION")
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}


class Sink:
    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}}


@pytest.fixture(scope="module")
def test_nodes():
    with registered(TestSources=Sources, TestSink=Sink):
        yield


MODEL, VAE, RESULT, TARGET, CLIP, IMAGE, CLIP_VISION, INVERSION = (["1", i] for i in range(8))
PHOTO = {"model": MODEL, "clip": CLIP, "vae": VAE, "image": IMAGE, "source_prompt": "a red disc", "width": 64,
         "height": 64, "seed": 0, "precision": "auto", "disk_cache": False}
INVERT = {"model": MODEL, "clip": CLIP, "vae": VAE, "image": IMAGE, "source_prompt": "a red disc", "width": 64,
          "height": 64, "crop": "center (reference)", "steps": 10, "guidance": 7.5}
NODES = {
    "ForgeditP2PEdit": {"model": MODEL, "clip": CLIP, "vae": VAE, "inversion": INVERSION,
                        "target_prompt": "a blue disc", "edit_type": "replace", "tau_v": "0.5", "tau_c": "0.6",
                        "tau_s": "0.6", "tau_u": "0, 0.5", "blend_source_words": "red", "blend_target_words": "blue",
                        "blend_threshold": 0.3, "blend_start": 0.2, "reweight": "blue:2", "aligner": "reference",
                        "selfattn_levels": "reference", "batch_mode": "auto", "guidance": 0.0},
    "ForgeditDDIMInversion": INVERT,
    "ForgeditNullTextInversion": {**INVERT, "inner_steps": 10, "early_stop": True, "precision": "auto",
                                  "disk_cache": False},
    "ForgeditStyleDiffusionTrain": {**INVERT, "clip_vision": CLIP_VISION, "inner_steps": 100, "attention_loss": True,
                                    "early_stop": True, "seed": 0, "precision": "exact", "disk_cache": False},
    "ForgeditSampler": {"model": MODEL, "result": RESULT, "target": TARGET, "vae": VAE, "mode": "vs",
                        "gammas": "0.5, 0.6", "alphas": "0.7", "seeds": "0, 1", "steps": 3, "cfg": 7.5,
                        "sampler_name": "euler_ancestral", "scheduler": "forgedit_reference", "batch_size": 4},
    "ForgeditInterpolate": {"result": RESULT, "target": TARGET, "mode": "vs", "gammas": "0.6", "alphas": "0.7"},
    "ForgeditForget": {"model": MODEL, "result": RESULT, "strategy": "encoderattn", "degree": 0.0,
                       "forget_pattern": ""},
    "ForgeditFinetune": {**PHOTO, "samples": 8, "batch_size": 4, "unet_lr": 6e-5, "text_lr": 1e-3, "early_stop": False},
    "ForgeditImagic": {**PHOTO, "target_prompt": "a blue disc", "recipe": "imagic (paper)", "text_steps": 0,
                       "unet_steps": 0, "text_lr": 0.0, "unet_lr": 0.0, "batch_size": 1},
    "ForgeditDreamBooth": {**PHOTO, "samples": 8, "batch_size": 4, "unet_lr": 5e-6, "text_lr": 5e-6},
    "ForgeditSave": {"result": RESULT, "filename_prefix": "forgedit", "dtype": "fp16"},
    "ForgeditExportLora": {"result": RESULT, "strategy": "donotforget", "degree": 0.0, "filename_prefix": "f/f",
                           "dtype": "fp16", "forget_pattern": ""},
}


def validate(class_type, **inputs):
    prompt = {"1": {"class_type": "TestSources", "inputs": {}},
              "2": {"class_type": class_type, "inputs": {**NODES[class_type], **inputs}}}
    if nodes.NODE_CLASS_MAPPINGS[class_type].RETURN_TYPES:
        prompt["3"] = {"class_type": "TestSink", "inputs": {"value": ["2", 0]}}
    valid, _, _, node_errors = asyncio.run(execution.validate_prompt("validate", prompt, None))
    return valid, node_errors


@pytest.mark.parametrize("class_type", NODES)
def test_good_prompts_validate(test_nodes, class_type):
    assert validate(class_type) == (True, {})


@pytest.mark.parametrize("class_type, inputs, name, message", [
    ("ForgeditSampler", {"gammas": "0.5,,0.7"}, "gammas", "gammas: item 2 of '0.5,,0.7' is empty"),
    ("ForgeditSampler", {"seeds": "0, 1.5"}, "seeds", "seeds: '1.5' is not a seed"),
    ("ForgeditSampler", {"gammas": "0:2.55:0.01", "seeds": "0:4:1"}, "seeds",
     "gammas x seeds = 256 x 5 = 1280 images; at most 1024"),
    ("ForgeditSampler", {"mode": "vp", "alphas": "0.7, x"}, "alphas", "alphas: cannot read 'x'"),
    ("ForgeditSampler", {"mode": "xx"}, "mode", "mode must be 'vs' or 'vp', got 'xx'"),
    # ComfyUI 0.3.64 checks no V3 combo against its options: the node does
    ("ForgeditSampler", {"sampler_name": "nope"}, "sampler_name", "sampler_name 'nope' is not a ComfyUI sampler"),
    ("ForgeditSampler", {"scheduler": "nope"}, "scheduler", "scheduler 'nope' is not forgedit_reference"),
    ("ForgeditInterpolate", {"gammas": "0.5, abc"}, "gammas", "gammas: cannot read 'abc'"),
    ("ForgeditInterpolate", {"mode": "vp", "alphas": "0.7,"}, "alphas", "alphas: item 2 of '0.7,' is empty"),
    ("ForgeditInterpolate", {"mode": "vp", "gammas": "0:2.55:0.01", "alphas": "0:0.4:0.1"}, "alphas",
     "alphas x gammas = 5 x 256 = 1280 settings; at most 1024"),
    ("ForgeditForget", {"strategy": "custom (regex)"}, "forget_pattern", "forget_pattern is empty"),
    ("ForgeditForget", {"strategy": "custom (regex)", "forget_pattern": "("}, "forget_pattern",
     "forget_pattern is not a valid regular expression"),
    ("ForgeditForget", {"strategy": "forgeteverything"}, "strategy", "unknown forgetting strategy 'forgeteverything'"),
    ("ForgeditFinetune", {"width": 100}, "width", "width and height must be multiples of 8 (got 100x64)"),
    ("ForgeditFinetune", {"width": 32}, "width", "width is 32, below its minimum 64"),
    ("ForgeditFinetune", {"samples": 3}, "samples", "samples (3) must be at least batch_size (4)"),
    ("ForgeditFinetune", {"source_prompt": " "}, "source_prompt", "source_prompt is empty"),
    ("ForgeditFinetune", {"precision": "fastest"}, "precision", "precision 'fastest' is not one of: auto, exact"),
    ("ForgeditDreamBooth", {"height": 60}, "height", "height is 60, below its minimum 64"),
    ("ForgeditImagic", {"target_prompt": ""}, "target_prompt", "target_prompt is empty"),
    ("ForgeditImagic", {"recipe": "forgedit-imagic", "source_prompt": ""}, "source_prompt", "source_prompt is empty"),
    ("ForgeditImagic", {"recipe": "imagic (2023)"}, "recipe", "recipe 'imagic (2023)' is not one of"),
    ("ForgeditSave", {"dtype": "fp8"}, "dtype", "dtype 'fp8' is not one of: fp16, fp32"),
    ("ForgeditP2PEdit", {"tau_c": "0.2, x"}, "tau_c", "tau_c: cannot read 'x'"),
    ("ForgeditP2PEdit", {"tau_s": "1.2"}, "tau_s", "between 0 and 1"),
    ("ForgeditP2PEdit", {"reweight": "blue"}, "reweight", "reweight"),
    ("ForgeditP2PEdit", {"blend_target_words": ""}, "blend_target_words", "LocalBlend needs words of both prompts"),
    ("ForgeditP2PEdit", {"target_prompt": "a (blue:1.3) disc"}, "target_prompt", "weight syntax"),
    ("ForgeditP2PEdit", {"aligner": "best"}, "aligner", "aligner 'best' is not one of"),
    ("ForgeditDDIMInversion", {"width": 100}, "width", "width and height must be multiples of 8 (got 100x64)"),
    ("ForgeditDDIMInversion", {"crop": "fill"}, "crop", "crop 'fill' is not one of: center (reference), stretch"),
    ("ForgeditNullTextInversion", {"source_prompt": " "}, "source_prompt", "source_prompt is empty"),
    ("ForgeditStyleDiffusionTrain", {"steps": 1}, "steps", "steps is 1, below its minimum 2"),
    ("ForgeditStyleDiffusionTrain", {"precision": "fp8"}, "precision", "precision 'fp8' is not one of"),
    ("ForgeditExportLora", {"strategy": "custom (regex)", "forget_pattern": "["}, "forget_pattern",
     "forget_pattern is not a valid regular expression"),
])
def test_bad_lists_and_patterns_fail_at_queue_time(test_nodes, class_type, inputs, name, message):
    valid, node_errors = validate(class_type, **inputs)
    assert valid is False and list(node_errors) == ["2"] and node_errors["2"]["class_type"] == class_type
    errors = {e["extra_info"]["input_name"]: e for e in node_errors["2"]["errors"]}
    assert errors[name]["type"] == "custom_validation_failed" and message in errors[name]["details"]


def test_alphas_are_not_read_in_vs_and_comfyui_still_checks_the_numbers(test_nodes):
    assert validate("ForgeditSampler", alphas="x")[0] is True
    assert validate("ForgeditInterpolate", alphas="x")[0] is True
    for class_type, inputs in (("ForgeditSampler", {"steps": 0}), ("ForgeditP2PEdit", {"guidance": -1.0})):
        valid, node_errors = validate(class_type, **inputs)
        assert valid is False and [e["type"] for e in node_errors["2"]["errors"]] == ["value_smaller_than_min"]


def test_a_linked_list_is_left_to_execute(test_nodes):
    """ComfyUI passes validate_inputs None for a linked input: the node checks its value when it runs."""
    prompt = {"1": {"class_type": "TestSources", "inputs": {}},
              "4": {"class_type": "PrimitiveString", "inputs": {"value": "0.5,,0.7"}},
              "2": {"class_type": "ForgeditSampler", "inputs": {**NODES["ForgeditSampler"], "gammas": ["4", 0]}},
              "3": {"class_type": "TestSink", "inputs": {"value": ["2", 0]}}}
    valid, _, _, node_errors = asyncio.run(execution.validate_prompt("validate", prompt, None))
    assert valid is True and node_errors == {}
