"""The UI -> API converter (workflow_api.py) offline, against a committed /object_info snapshot of this pack and the
core nodes the shipped workflows use (tests/ops/data/object_info.json; tests/comfy/test_workflows.py checks that it
still equals a real server's). No ComfyUI import: standard library and the shipped files."""
import json
import subprocess
import sys

import pytest
from find_comfyui import PACK, load_module

WORKFLOWS = PACK / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))


api = load_module("forgedit_workflow_api", "workflow_api.py")


@pytest.fixture(scope="module")
def object_info() -> dict:
    return json.loads((PACK / "tests" / "ops" / "data" / "object_info.json").read_text(encoding="utf-8"))


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def test_the_converter_imports_nothing_but_the_standard_library():
    code = ("import importlib.util, sys; before = set(sys.modules); "
            f"spec = importlib.util.spec_from_file_location('workflow_api', {str(PACK / 'workflow_api.py')!r}); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def jpeg_size_ok(path) -> bool:
    data = path.read_bytes()
    return data[:2] == b"\xff\xd8" and len(data) < 100_000


NOTE_WORDS = {  # what the notes of each family of workflows must explain
    "forgedit": ("encoderattn", "decoderattn", "0.5", "0.7", "1.0", "1.4", "Load Checkpoint"),
    "p2p": ("tau_c", "tau_s", "tau_u", "tau_v", "0.6", "0.8", "replace", "blend", "reweight", "Load Checkpoint",
            "python run.py"),
    "metrics": ("NS-LPIPS", "Forgedit Word Mask", "models/lpips", "alexnet-owt-7be5be79.pth", "Load Checkpoint",
                "python run.py"),
}


@pytest.mark.parametrize("name", NAMES)
def test_workflows_are_saved_as_the_frontend_saves_them(name, object_info):
    wf = load_workflow(name)
    assert {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"} <= set(wf)
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == max(link[0] for link in wf["links"])
    assert sorted(n["order"] for n in wf["nodes"]) == list(range(len(nodes)))
    for link_id, origin, slot, target, target_slot, kind in wf["links"]:
        assert link_id in nodes[origin]["outputs"][slot]["links"] and nodes[origin]["outputs"][slot]["type"] == kind
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[target]["order"] > nodes[origin]["order"]
    notes = [n for n in wf["nodes"] if n["type"] == "MarkdownNote"]
    assert notes and all(len(n["widgets_values"]) == 1 for n in notes)
    text = " ".join(n["widgets_values"][0] for n in notes)
    types = {n["type"] for n in wf["nodes"]}
    family = "p2p" if "ForgeditP2PEdit" in types else "metrics" if "ForgeditNSLPIPS" in types else "forgedit"
    assert [word for word in NOTE_WORDS[family] if word not in text] == []
    for n in wf["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                "widgets_values"} <= set(n)
        if n["type"] in ("MarkdownNote", "PrimitiveNode"):
            continue
        assert n["properties"] == {"Node name for S&R": n["type"]}
        expected = sum(1 + extra for _, extra in api.widget_inputs(object_info[n["type"]]))
        assert len(n["widgets_values"]) == expected, n["type"]
        outputs = object_info[n["type"]]
        assert [(o["name"], o["type"]) for o in n["outputs"]] == list(zip(outputs["output_name"], outputs["output"]))
    assert jpeg_size_ok(WORKFLOWS / f"{name}.jpg")


@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_workflow_converts(name, object_info):
    prompt, _ = api.convert(load_workflow(name), object_info)
    for node_id, node in prompt.items():
        info = object_info[node["class_type"]]
        required = set(info["input"].get("required", {}))
        assert required <= set(node["inputs"]), (node_id, required - set(node["inputs"]))
        for value in node["inputs"].values():
            if isinstance(value, list):  # a link: [node id, output slot] of a node in the prompt
                assert value[0] in prompt and value[1] < len(object_info[prompt[value[0]]["class_type"]]["output"])


def test_conversion_maps_widgets_positionally_and_skips_frontend_extras(object_info):
    prompt, primitives = api.convert(load_workflow("forgedit_single_gamma_ksampler"), object_info)
    by_class = {n["class_type"]: n for n in prompt.values()}
    assert "MarkdownNote" not in by_class and "PrimitiveNode" not in by_class
    ksampler = by_class["KSampler"]["inputs"]
    assert {k: v for k, v in ksampler.items() if not isinstance(v, list)} == {
        "seed": 0, "steps": 50, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}
    assert by_class["LoadImage"]["inputs"] == {"image": "example.png"}
    finetune = by_class["ForgeditFinetune"]["inputs"]
    assert [finetune[k] for k in ("seed", "early_stop", "precision", "disk_cache")] == [0, False, "auto", False]
    assert finetune["width"] == finetune["height"] == by_class["EmptyLatentImage"]["inputs"]["width"] == 512
    assert sorted(p["title"] for p in primitives.values()) == ["height", "width"]
    api.set_input(prompt, primitives, object_info, "width.value=64")
    assert finetune["width"] == by_class["EmptyLatentImage"]["inputs"]["width"] == 64 and finetune["height"] == 512
    vanilla, _ = api.convert(load_workflow("forgedit_vanilla"), object_info)
    tune = next(n for n in vanilla.values() if n["class_type"] == "ForgeditFinetune")["inputs"]
    caption = next(i for i, n in vanilla.items() if n["class_type"] == "ForgeditCaption")
    assert tune["source_prompt"] == [caption, 0]


def test_conversion_follows_reroutes_and_handles_muted_and_bypassed_nodes(object_info):
    wf = load_workflow("forgedit_single_gamma_ksampler")
    nodes = {n["type"]: n for n in wf["nodes"] if n["type"] != "PrimitiveNode"}
    links = {link[0]: link for link in wf["links"]}
    # a Reroute on the Forget -> KSampler model link
    model_link = links[next(i["link"] for i in nodes["KSampler"]["inputs"] if i["name"] == "model")]
    reroute = {"id": 99, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 98}],
               "outputs": [{"name": "", "type": "MODEL", "links": [model_link[0]]}]}
    wf["nodes"].append(reroute)
    wf["links"].append([98, model_link[1], model_link[2], 99, 0, "MODEL"])
    model_link[1:3] = [99, 0]
    prompt, _ = api.convert(wf, object_info)
    ksampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")["inputs"]
    assert ksampler["model"] == [str(nodes["ForgeditForget"]["id"]), 0]
    # bypassed Forget: its MODEL input (the checkpoint) passes through
    nodes["ForgeditForget"]["mode"] = api.BYPASSED
    prompt, _ = api.convert(wf, object_info)
    assert str(nodes["ForgeditForget"]["id"]) not in prompt
    ksampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")["inputs"]
    assert ksampler["model"] == [str(nodes["CheckpointLoaderSimple"]["id"]), 0]
    # bypassed Interpolate: its CONDITIONING input (the target prompt) passes through, as the frontend does it
    nodes["ForgeditInterpolate"]["mode"] = api.BYPASSED
    prompt, _ = api.convert(wf, object_info)
    ksampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")["inputs"]
    assert ksampler["positive"] == [str(next(n["id"] for n in wf["nodes"] if n.get("title") == "Target prompt")), 0]
    # bypassed VAE Decode: no IMAGE input to pass on -> a clear error; muted, it is dropped with what it feeds
    nodes["VAEDecode"]["mode"] = api.BYPASSED
    with pytest.raises(api.RunError, match=r"node \d+ 'VAE Decode' \(VAEDecode\) is bypassed but has no IMAGE input"):
        api.convert(wf, object_info)
    nodes["VAEDecode"]["mode"] = api.MUTED
    prompt, _ = api.convert(wf, object_info)
    assert "VAEDecode" not in {n["class_type"] for n in prompt.values()}
    assert "images" not in next(n for n in prompt.values() if n["class_type"] == "SaveImage")["inputs"]
    nodes["VAEDecode"]["mode"] = 0
    nodes["VAEDecode"]["type"] = "NoSuchNode"
    with pytest.raises(api.RunError, match="NoSuchNode, which this server does not have"):
        api.convert(wf, object_info)


def test_set_input_target_and_class_inputs(object_info):
    prompt, primitives = api.convert(load_workflow("forgedit_single_gamma_ksampler"), object_info)
    api.set_input(prompt, primitives, object_info, "KSampler.steps=7")
    api.set_input(prompt, primitives, object_info, "ForgeditFinetune.early_stop=yes")
    api.set_target(prompt, "a blue square")
    by_class = {n["class_type"]: n["inputs"] for n in prompt.values()}
    assert by_class["KSampler"]["steps"] == 7 and by_class["ForgeditFinetune"]["early_stop"] is True
    target = next(n for n in prompt.values() if n["_meta"]["title"] == "Target prompt")
    assert target["inputs"]["text"] == "a blue square"
    with pytest.raises(api.RunError, match="KSampler.steps takes a number, not 'many'"):
        api.set_input(prompt, primitives, object_info, "KSampler.steps=many")
    with pytest.raises(api.RunError, match=r"no input 'gamma'|has no value input 'gamma'"):
        api.set_input(prompt, primitives, object_info, "KSampler.gamma=1")
    with pytest.raises(api.RunError, match="this workflow has no ForgeditSampler node"):
        api.set_class_input(prompt, {"ForgeditSampler": "gammas"}, "0.5", "gamma")


def test_missing_model_files_name_the_file_and_the_folder(object_info):
    prompt, _ = api.convert(load_workflow("forgedit_vanilla"), object_info)
    missing = api.missing_model_files(prompt, object_info)  # the workflows name SD 1.5 and the base BLIP
    assert {(m[1], m[2], m[3]) for m in missing} == {
        ("ckpt_name", "v1-5-pruned-emaonly-fp16.safetensors", "checkpoints"),
        ("blip_model", "blip-image-captioning-base", "blip")}
    checkpoints = object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
    have = api.combo_options(checkpoints)
    assert have, "the snapshot lists the test checkpoint"
    api.set_class_input(prompt, {"CheckpointLoaderSimple": "ckpt_name"}, have[0], "--checkpoint")
    api.set_class_input(prompt, {"ForgeditCaption": "blip_model"}, "tiny-blip", "--set")
    assert api.missing_model_files(prompt, object_info) == []
    reedit, _ = api.convert(load_workflow("forgedit_reedit_saved"), object_info)
    api.set_class_input(reedit, {"ForgeditLoad": "file"}, "nothing.safetensors", "--set")
    assert ("file", "nothing.safetensors", "forgedit") in {(m[1], m[2], m[3]) for m in
                                                           api.missing_model_files(reedit, object_info)}


def test_target_and_source_reach_the_p2p_edit_and_the_inversion(object_info):
    prompt, _ = api.convert(load_workflow("stylediffusion_edit"), object_info)
    api.set_target(prompt, "black and white cat playing red ball on black carpet")
    api.set_source(prompt, "black and white dog playing red ball on grey carpet")
    by_class = {n["class_type"]: n["inputs"] for n in prompt.values()}
    assert by_class["ForgeditP2PEdit"]["target_prompt"] == "black and white cat playing red ball on black carpet"
    assert by_class["ForgeditStyleDiffusionTrain"]["source_prompt"] == \
        "black and white dog playing red ball on grey carpet"
    reedit, _ = api.convert(load_workflow("stylediffusion_reedit_saved"), object_info)
    api.set_target(reedit, "black and white cat playing red ball on black carpet")
    with pytest.raises(api.RunError, match="--source: no Forgedit node in this workflow has a typed source_prompt"):
        api.set_source(reedit, "a dog")
    metric, _ = api.convert(load_workflow("ns_lpips"), object_info)
    api.set_source(metric, "a dog on a sofa")
    assert next(n for n in metric.values() if n["class_type"] == "ForgeditWordMask")["inputs"]["prompt"] == \
        "a dog on a sofa"
    vanilla, _ = api.convert(load_workflow("forgedit_vanilla"), object_info)  # its source prompt is the caption's
    with pytest.raises(api.RunError, match="--source: no Forgedit node"):
        api.set_source(vanilla, "a dog")
    edit = next(n for n in reedit.values() if n["class_type"] == "ForgeditP2PEdit")
    edit["class_type"] = "SomethingElse"
    with pytest.raises(api.RunError, match="--target: no CLIP Text Encode .* and no Forgedit P2P / P2Plus Edit"):
        api.set_target(reedit, "a tiger")


def test_missing_image_encoder_and_inversion_files_name_their_folders(object_info):
    prompt, _ = api.convert(load_workflow("stylediffusion_edit"), object_info)
    assert {(m[1], m[2], m[3]) for m in api.missing_model_files(prompt, object_info)} == {
        ("ckpt_name", "v1-5-pruned-emaonly-fp16.safetensors", "checkpoints"),
        ("clip_name", "clip-vit-base-patch16.safetensors", "clip_vision")}  # the snapshot's file lists are emptied
    reedit, _ = api.convert(load_workflow("stylediffusion_reedit_saved"), object_info)
    assert ("file", "stylediffusion_00001_.safetensors", "stylediffusion") in {
        (m[1], m[2], m[3]) for m in api.missing_model_files(reedit, object_info)}
