"""Forgedit Save / Load / Export LoRA and the fine-tune's disk cache, in temporary model folders."""
import logging
import os

import comfy.model_management
import comfy.utils
import pytest
import torch
from conftest import FINETUNE, assert_base_untouched, run_node
from forgedit_ops.storage import cache_key, load_result, lora_key, metadata_header
from safetensors.torch import save_file
from tiny_models import tiny_model


@pytest.fixture
def folders(comfy, tmp_path, monkeypatch):
    """models/forgedit and models/loras inside tmp_path; ComfyUI's folder table and file-list cache are restored after."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    paths = {}
    for name in ("forgedit", "loras"):
        paths[name] = tmp_path / name
        paths[name].mkdir()
        extensions = folder_paths.folder_names_and_paths[name][1]
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(paths[name])], extensions))
    return paths


def run_output_node(node_id, **inputs) -> str:
    """Execute an output node as the executor does; returns the text its UI shows (the saved path)."""
    import nodes
    from comfy_api.internal import make_locked_method_func

    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    f = make_locked_method_func(cls, "EXECUTE_NORMALIZED", cls.PREPARE_CLASS_CLONE({"UNIQUE_ID": "1"}))
    with torch.inference_mode():
        return f(**inputs).ui.as_dict()["text"][0]


def options(node_id, name) -> list[str]:
    """The choices a node's combo offers now (V1 list or V3 options)."""
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"][name]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def load(name, ignore_base_mismatch=False):
    result, = run_node("ForgeditLoad", file=name, ignore_base_mismatch=ignore_base_mismatch)
    return result


def edit(tiny, result):
    """Forget + a short sweep (2 gammas, 1 seed, 3 steps): the latents a loaded result has to reproduce."""
    target, = run_node("CLIPTextEncode", clip=tiny["clip"], text="a blue square")
    edited, = run_node("ForgeditForget", model=tiny["model"], result=result, strategy="donotforget", degree=0.0)
    latent, _, _, _ = run_node("ForgeditSampler", model=edited, result=result, target=target, vae=tiny["vae"], mode="vs",
                            gammas="0, 0.8", alphas="0.7", seeds="3", steps=3, cfg=7.5, sampler_name="ddim",
                            scheduler="forgedit_reference", batch_size=2)
    return latent["samples"]


@pytest.fixture(scope="module")
def edited(tiny, finetuned):
    """The sweep of the in-memory result."""
    return edit(tiny, finetuned)


def weights(model) -> dict[str, torch.Tensor]:
    """The diffusion model's weights with exactly this MODEL's patches applied (unloaded again afterwards)."""
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    sd = {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    comfy.model_management.unload_all_models()
    return sd


def test_the_forgedit_folder_is_registered(comfy):
    import folder_paths

    assert os.path.join(folder_paths.models_dir, "forgedit") in folder_paths.get_folder_paths("forgedit")


@pytest.mark.parametrize("node_id", ["ForgeditCaption", "ForgeditSave", "ForgeditLoad", "ForgeditExportLora"])
def test_nodes_are_documented(comfy, node_id):
    schema = comfy.nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
    assert schema.category == "forgedit" and schema.description and all(i.tooltip for i in schema.inputs)


def test_fp32_save_load_round_trips_exactly_and_samples_the_same(tiny, finetuned, edited, folders):
    path = run_output_node("ForgeditSave", result=finetuned, filename_prefix="forgedit", dtype="fp32")
    assert path == str(folders["forgedit"] / "forgedit_00001_.safetensors")
    assert options("ForgeditLoad", "file") == ["forgedit_00001_.safetensors"]
    loaded = load("forgedit_00001_.safetensors")
    assert loaded.deltas.keys() == finetuned.deltas.keys()
    assert all(torch.equal(loaded.deltas[k], d) and loaded.deltas[k].dtype == torch.float32
               for k, d in finetuned.deltas.items())
    assert torch.equal(loaded.source_embedding, finetuned.source_embedding)
    assert torch.equal(loaded.uncond_embedding, finetuned.uncond_embedding)
    assert loaded.metadata == finetuned.metadata
    assert torch.equal(edit(tiny, loaded), edited)
    assert_base_untouched(tiny)


def test_fp16_save_is_half_the_size_and_samples_closely(tiny, finetuned, edited, folders):
    path = run_output_node("ForgeditSave", result=finetuned, filename_prefix="cats/sitting", dtype="fp16")
    assert path == str(folders["forgedit"] / "cats" / "sitting_00001_.safetensors")
    second = run_output_node("ForgeditSave", result=finetuned, filename_prefix="cats/sitting", dtype="fp16")
    assert second.endswith("sitting_00002_.safetensors")
    with open(path, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    params = sum(d.numel() for d in finetuned.deltas.values())
    assert os.path.getsize(path) - header == 2 * params + 2 * 4 * finetuned.source_embedding.numel()
    loaded = load(os.path.join("cats", "sitting_00001_.safetensors"))
    for k, d in finetuned.deltas.items():
        assert torch.equal(loaded.deltas[k], d.half().float())
    assert torch.equal(loaded.source_embedding, finetuned.source_embedding)
    assert torch.allclose(edit(tiny, loaded), edited, atol=1e-3)
    assert_base_untouched(tiny)


def test_a_wrong_base_is_refused_unless_overridden(tiny, finetuned, folders):
    run_output_node("ForgeditSave", result=finetuned, filename_prefix="forgedit", dtype="fp16")
    with torch.inference_mode():
        other = tiny_model(seed=99)
    with pytest.raises(ValueError, match="trained on another base model.*ignore_base_mismatch"):
        run_node("ForgeditForget", model=other, result=load("forgedit_00001_.safetensors"), strategy="donotforget",
                 degree=0.0)
    forced = load("forgedit_00001_.safetensors", ignore_base_mismatch=True)
    edited, = run_node("ForgeditForget", model=other, result=forced, strategy="donotforget", degree=0.0)
    assert len(edited.patches) == 518
    run_output_node("ForgeditSave", result=forced, filename_prefix="forgedit", dtype="fp16")
    reloaded = load("forgedit_00002_.safetensors")
    assert not reloaded.accept_any_base and "ignore_base_mismatch" not in reloaded.metadata


def test_broken_and_foreign_files_are_named_and_explained(finetuned, folders):
    good = run_output_node("ForgeditSave", result=finetuned, filename_prefix="forgedit", dtype="fp16")
    data = open(good, "rb").read()
    (folders["forgedit"] / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    (folders["forgedit"] / "notes.safetensors").write_text("these are my notes, not a model")
    save_file({"lora_unet_input_blocks_4_0_in_layers_2.lora_up.weight": torch.zeros(4, 2)},
              str(folders["forgedit"] / "style_lora.safetensors"), {"ss_network_dim": "2"})
    for name, message in [("truncated", "is truncated"), ("notes", "is not a safetensors file"),
                          ("style_lora", "is not a Forgedit result: its header has no 'forgedit.format'")]:
        with pytest.raises(ValueError, match=f"{name}.safetensors {message}"):
            load(f"{name}.safetensors")


@pytest.mark.parametrize("strategy, degree, dtype", [("donotforget", 0.0, "fp32"), ("encoderattn", 0.5, "fp32"),
                                                     ("decoderkv", 0.0, "fp16")])
def test_exported_lora_applied_by_core_equals_forget(tiny, finetuned, folders, caplog, strategy, degree, dtype):
    path = run_output_node("ForgeditExportLora", result=finetuned, strategy=strategy, degree=degree,
                           filename_prefix="forgedit/edit", dtype=dtype)
    assert path == str(folders["loras"] / "forgedit" / "edit_00001_.safetensors")
    assert "forgedit/edit_00001_.safetensors" in options("LoraLoaderModelOnly", "lora_name")
    with caplog.at_level(logging.WARNING):
        lora, = run_node("LoraLoaderModelOnly", model=tiny["model"], lora_name="forgedit/edit_00001_.safetensors",
                         strength_model=1.0)
    assert "lora key not loaded" not in caplog.text
    forget, = run_node("ForgeditForget", model=tiny["model"], result=finetuned, strategy=strategy, degree=degree)
    got, expected = weights(lora), weights(forget)
    assert any(not torch.equal(v, tiny["base"][k]) for k, v in expected.items())
    for k, v in expected.items():
        assert torch.equal(got[k], v) if dtype == "fp32" else torch.allclose(got[k], v, atol=1e-6, rtol=1e-3), k
    assert_base_untouched(tiny)
    with pytest.raises(ValueError, match="Forgedit LoRA export.*LoraLoaderModelOnly"):
        load_result(path)


def finetune(tiny, **overrides):
    result, = run_node("ForgeditFinetune", **{**dict(model=tiny["model"], clip=tiny["clip"], vae=tiny["vae"],
                                                     image=tiny["image"]), **FINETUNE, **overrides})
    return result


def test_disk_cache_skips_the_second_finetune(tiny, folders):
    steps = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: steps.append(value))
    try:
        first = finetune(tiny, disk_cache=True)
        trained = len(steps)
        second = finetune(tiny, disk_cache=True)
        cached = len(steps) - trained
        reseeded = finetune(tiny, disk_cache=True, seed=1)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert trained == 2 and cached == 0 and len(steps) == 4
    assert second.metadata == first.metadata and reseeded.metadata["seed"] == 1
    assert all(torch.equal(second.deltas[k], d) for k, d in first.deltas.items())
    assert torch.equal(second.source_embedding, first.source_embedding)
    assert len(list((folders["forgedit"] / "cache").glob("*.safetensors"))) == 2
    assert options("ForgeditLoad", "file") == []


def test_lora_keys_are_core_diff_keys():
    assert lora_key("input_blocks.4.0.in_layers.2.weight") == "diffusion_model.input_blocks.4.0.in_layers.2.diff"
    assert lora_key("input_blocks.4.0.in_layers.2.bias") == "diffusion_model.input_blocks.4.0.in_layers.2.diff_b"


def test_header_is_json():
    header = metadata_header({"seed": 3, "losses": [0.5, 0.25], "source_prompt": "a cat"}, format="1")
    assert header == {"forgedit.format": "1", "seed": "3", "losses": "[0.5, 0.25]", "source_prompt": '"a cat"'}


def test_cache_key_changes_with_every_input():
    image = torch.rand(1, 8, 8, 3)
    key = cache_key({"seed": 0, "prompt": "a cat"}, {"image": image})
    assert key == cache_key({"prompt": "a cat", "seed": 0}, {"image": image.clone()}) and len(key) == 32
    assert key != cache_key({"seed": 1, "prompt": "a cat"}, {"image": image})
    assert key != cache_key({"seed": 0, "prompt": "a cat"}, {"image": image + 1e-6})
