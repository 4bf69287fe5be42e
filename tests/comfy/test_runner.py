"""run.py end to end against real ComfyUI servers on CPU: the shipped workflows run (the Forgedit ones, the
StyleDiffusion / null-text inversions edited with P2P, NS-LPIPS on two images), bad inputs come back as node errors (a
missing model file before anything is queued), an interrupt or --timeout stops a fine-tune, a crash inside run.py exits
non-zero, --batch spreads edits over two servers, and without --server run.py starts its own ComfyUI, stops it, or
keeps it for the next call (which then does not retrain)."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error

import pytest
from find_comfyui import PACK, comfyui_path
from PIL import Image
from safetensors import safe_open
from servers import (  # noqa: F401  the fixtures too (alexnet ... server): pytest finds them by name in this module
    CHECKPOINT, CLIP_VISION, IMAGES, SCORE_CLIP, SD2_CHECKPOINT, SERVER_ARGS, SMALL, WORKFLOWS, Server, add_model, alexnet,
    blip_root, checkpoint, clip_vision, load_workflow, models, object_info, photos, pngs, prepare_base, run, run_cli,
    run_small, score_clip, sd2_checkpoint, server, wait_until)


@pytest.fixture(scope="module")
def vanilla_run(server, photos, tmp_path_factory):
    """The vanilla workflow once (caption, fine-tune, forget, γ sweep, save); the re-edit test loads its result."""
    out = tmp_path_factory.mktemp("vanilla_out")
    return run_small(server, "forgedit_vanilla", out, image=photos[0]), out


def test_vanilla_workflow_runs(vanilla_run, server):
    done, out = vanilla_run
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()
    assert len(pngs(out)) == IMAGES["forgedit_vanilla"]
    assert "Forgedit Fine-tune: step 2/2" in done.stdout and "Source prompt (caption): " in done.stdout
    assert all(Image.open(p).size == (64, 64) for p in pngs(out) if "edit" in p.name)
    assert Image.open(next(p for p in pngs(out) if "grid" in p.name)).size > (128, 128)
    saved = [p.name for p in (server.base / "models" / "forgedit").glob("*.safetensors")]
    assert saved == ["forgedit_00001_.safetensors"]


def test_reedit_workflow_runs_without_retraining(vanilla_run, server, tmp_path):
    done = run_small(server, "forgedit_reedit_saved", tmp_path, target="a jumping dog")
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()
    assert len(pngs(tmp_path)) == IMAGES["forgedit_reedit_saved"]
    assert "ForgeditFinetune" not in done.stdout and "(ForgeditLoad)" in done.stdout


def test_vanilla_workflow_runs_on_an_sd2_v_checkpoint(vanilla_run, server, sd2_checkpoint, photos, tmp_path):
    add_model(server, f"models/checkpoints/{SD2_CHECKPOINT}", sd2_checkpoint)
    done = run_small(server, "forgedit_vanilla", tmp_path, "--checkpoint", SD2_CHECKPOINT, image=photos[0])
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()
    assert len(pngs(tmp_path)) == IMAGES["forgedit_vanilla"]
    assert "Forgedit Fine-tune: step 2/2" in done.stdout
    assert all(Image.open(p).size == (64, 64) for p in pngs(tmp_path) if "edit" in p.name)
    saved = server.base / "models" / "forgedit" / "forgedit_00002_.safetensors"
    with safe_open(str(saved), "pt") as f:
        header = f.metadata()
        assert f.get_slice("source_embedding").get_shape() == [1, 77, 1024]
    assert json.loads(header["prediction"]) == "v" and json.loads(header["method"]) == "forgedit"


def test_single_gamma_ksampler_workflow_runs(server, photos, tmp_path):
    done = run_small(server, "forgedit_single_gamma_ksampler", tmp_path, image=photos[1], target="a blue square")
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()
    assert [Image.open(p).size for p in pngs(tmp_path)] == [(64, 64)]
    assert "KSampler: step 2/2" in done.stdout


def test_score_workflow_scores_the_sweep_and_samples_full_size(server, photos, score_clip, tmp_path):
    """forgedit_score: the sweep (3 γ × 2 seeds) scored by Forgedit Score with a tiny random CLIP; its plot and table
    come back, its line names a γ of the sweep, and KSampler's image has the fine-tune's size and is the picked γ: Score's
    gamma / alpha outputs drive Forgedit Interpolate (its typed gammas, 0 here, is ignored), so the same graph with those
    links removed and the pick typed into gammas gives the same pixels (and from the cache, only that branch re-runs)."""
    add_model(server, f"models/clip_vision/{SCORE_CLIP}", score_clip)
    linked = tmp_path / "linked"
    done = run_small(server, "forgedit_score", linked, "--set", "ForgeditInterpolate.gammas=0", image=photos[0],
                     target="a blue disc")
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()
    images = {p.name.rsplit("_", 2)[0]: p for p in pngs(linked)}
    sizes = {name: Image.open(p).size for name, p in images.items()}
    assert len(pngs(linked)) == IMAGES["forgedit_score"] and set(images) == {"grid", "plot", "final"}
    assert sizes["final"] == (64, 64) and sizes["plot"] == (960, 400) and sizes["grid"] > (128, 128)
    picked = re.search(r"Forgedit Score: Forgedit Score \(threshold\): gamma ([0-9.]+);", done.stdout)
    assert picked and float(picked.group(1)) in (0.4, 0.6, 0.8), done.stdout
    table = done.stdout.partition("Score table: ")[2].splitlines()
    assert table[0].startswith("Forgedit Score (threshold): gamma ") and table[1].split("\t")[:2] == ["alpha", "gamma"]
    assert [row.split("\t")[1] for row in table[2:5]] == ["0.4", "0.6", "0.8"] and "direction" in table[1]
    assert "KSampler: step 2/2" in done.stdout

    workflow = load_workflow("forgedit_score")
    interpolate = next(n for n in workflow["nodes"] if n["type"] == "ForgeditInterpolate")
    score = next(n for n in workflow["nodes"] if n["type"] == "ForgeditScore")
    wired = {link[0] for link in workflow["links"] if link[1] == score["id"] and link[3] == interpolate["id"]}
    assert [(i["name"], i["link"] in wired) for i in interpolate["inputs"] if i["type"] == "FLOAT"] == \
        [("gamma", True), ("alpha", True)]
    workflow["links"] = [link for link in workflow["links"] if link[0] not in wired]
    for i in interpolate["inputs"]:
        i["link"] = None if i["link"] in wired else i["link"]
    for o in score["outputs"]:
        o["links"] = [x for x in o["links"] if x not in wired]
    (tmp_path / "typed.json").write_text(json.dumps(workflow), encoding="utf-8")
    typed = tmp_path / "typed"
    again = run_cli(tmp_path / "typed", "--image", photos[0], "--target", "a blue disc", "--out", typed,
                    *SMALL["forgedit_score"], "--set", f"ForgeditInterpolate.gammas={picked.group(1)}",
                    servers=[server.url])
    assert again.returncode == 0, again.stdout + again.stderr + server.log_tail()
    final = next(p for p in pngs(typed) if p.name.startswith("final_"))
    assert Image.open(final).tobytes() == Image.open(images["final"]).tobytes()


# --- StyleDiffusion and null-text inversion, edited with P2P / P2Plus -------------------------------------------------

SOURCE = "black and white dog playing red ball on white carpet"  # --source replaces the workflow's (black carpet)
TARGET = "black and white tiger playing red ball on white carpet"


def history_inputs(server, before: set) -> list[dict]:
    """{class type: inputs} of each prompt the server ran since `before` (a set of prompt ids)."""
    return [{n["class_type"]: n["inputs"] for n in e["prompt"][2].values()}
            for i, e in server.get("/history").items() if i not in before]


@pytest.fixture(scope="module")
def stylediffusion_run(server, photos, tmp_path_factory):
    """The StyleDiffusion workflow once (image encoder, training, the edit, the inversion saved); the re-edit test
    loads its file."""
    out, before = tmp_path_factory.mktemp("stylediffusion_out"), set(server.get("/history"))
    done = run_small(server, "stylediffusion_edit", out, "--source", SOURCE, image=photos[0], target=TARGET)
    return done, out, history_inputs(server, before)


def test_stylediffusion_workflow_runs(stylediffusion_run, server):
    done, out, ran = stylediffusion_run
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()
    assert len(pngs(out)) == IMAGES["stylediffusion_edit"]
    assert re.search(r"Forgedit StyleDiffusion Train: step (\d+)/\1 ", done.stdout), done.stdout
    assert "Forgedit Inversion Save: " in done.stdout  # the saved file's path, printed from the node's text output
    grid = next(p for p in pngs(out) if "grid" in p.name)
    assert Image.open(grid).size[0] >= 2 * 64 and all(Image.open(p).size == (64, 64) for p in pngs(out) if p != grid)
    saved = [p.name for p in (server.base / "models" / "stylediffusion").glob("*.safetensors")]
    assert saved == ["stylediffusion_00001_.safetensors"]
    (inputs,) = ran
    assert inputs["ForgeditStyleDiffusionTrain"]["source_prompt"] == SOURCE
    assert inputs["ForgeditStyleDiffusionTrain"]["steps"] == 4
    assert inputs["ForgeditImageEncoderLoader"]["clip_name"] == CLIP_VISION
    edit = inputs["ForgeditP2PEdit"]
    assert (edit["target_prompt"], edit["tau_v"], edit["tau_c"], edit["tau_s"], edit["tau_u"]) == (
        TARGET, "0.6", "0.6", "0.8", "0.5")


def test_nulltext_p2p_workflow_runs(server, photos, tmp_path):
    done = run_small(server, "nulltext_p2p", tmp_path, image=photos[1], target="a tiger sitting next to a mirror")
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()
    assert "Forgedit Null-text Inversion: step 1/12 " in done.stdout  # 4 x (1 + 2), fewer after an early stop
    (grid,) = pngs(tmp_path)
    assert Image.open(grid).size[0] >= 2 * 64 and Image.open(grid).size[1] >= 64


def test_stylediffusion_reedit_workflow_sweeps_tau_without_retraining(stylediffusion_run, server, tmp_path):
    done = run_small(server, "stylediffusion_reedit_saved", tmp_path, target=TARGET)
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()
    assert "ForgeditStyleDiffusionTrain" not in done.stdout and "(ForgeditInversionLoad)" in done.stdout
    (grid,) = pngs(tmp_path)
    assert Image.open(grid).size[1] >= 4 * 64  # τ_v 0.2, 0.5 x τ_u 0, 0.5: four rows


def test_batch_sets_the_target_and_the_taus_of_the_p2p_edit(stylediffusion_run, server, tmp_path):
    """A workflow without Load Image takes empty image cells; the target column may be named target_prompt."""
    (tmp_path / "edits.csv").write_text(f"image,target_prompt,tau_c,tau_u\n,{TARGET},0.4,\n,{TARGET},,0.2\n")
    before = set(server.get("/history"))
    done = run_cli("stylediffusion_reedit_saved", "--batch", tmp_path / "edits.csv", "--out", tmp_path / "out",
                   "--set", "ForgeditP2PEdit.tau_v=0.5", servers=[server.url])
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()
    assert sorted(p.parent.name for p in pngs(tmp_path / "out")) == [f"00{n}-{TARGET.replace(' ', '-')[:40]}"
                                                                     for n in (1, 2)]
    taus = sorted(tuple(i["ForgeditP2PEdit"][t] for t in ("target_prompt", "tau_v", "tau_c", "tau_s", "tau_u"))
                  for i in history_inputs(server, before))
    assert taus == [(TARGET, "0.5", "0.4", "0.6", "0, 0.5"), (TARGET, "0.5", "0.6", "0.6", "0.2")]


def test_ns_lpips_workflow_compares_two_images_under_the_word_mask(server, photos, tmp_path):
    """--image fills every Load Image node, --image NODE=PATH one of them: the same photo twice scores 0."""
    before = set(server.get("/history"))
    same = run_cli("ns_lpips", "--image", photos[0], "--out", tmp_path, *SMALL["ns_lpips"], servers=[server.url])
    assert same.returncode == 0, same.stdout + same.stderr + server.log_tail()
    assert "Forgedit NS-LPIPS: NS-LPIPS (paper): 0.0000 (mean of 1: 0.0000)" in same.stdout, same.stdout
    assert "Forgedit Word Mask: step 2/2 " in same.stdout
    done = run_cli("ns_lpips", "--image", photos[0], "--image", f"Edited image={photos[1]}", "--out", tmp_path,
                   *SMALL["ns_lpips"], servers=[server.url])
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()
    score = float(re.search(r"Forgedit NS-LPIPS: NS-LPIPS \(paper\): (\d+\.\d+)", done.stdout).group(1))
    assert score > 0 and pngs(tmp_path) == []
    ran = [e["prompt"][2].values() for i, e in server.get("/history").items() if i not in before]
    loaded = sorted(sorted((n["_meta"]["title"], n["inputs"]["image"]) for n in nodes if n["class_type"] == "LoadImage")
                    for nodes in ran)
    assert loaded == [[("Edited image", photos[i].name), ("Source photo", photos[0].name)] for i in (0, 1)]
    done = run_cli("ns_lpips", "--image", f"Nope={photos[1]}", "--out", tmp_path, *SMALL["ns_lpips"],
                   servers=[server.url])
    assert done.returncode == 1 and "--image Nope=" in done.stderr and "no Load Image node has the id or title 'Nope'" \
        in done.stderr, done.stderr


def test_missing_image_encoder_or_inversion_files_are_named_before_queueing(server, photos, tmp_path):
    done = run_cli("stylediffusion_edit", "--image", photos[0], "--target", TARGET, "--out", tmp_path,
                   servers=[server.url])
    assert done.returncode == 1
    for expected in ("a model file the workflow names is missing (nothing was queued)",
                     "(ForgeditImageEncoderLoader), input clip_name: no file 'clip-vit-base-patch16.safetensors' in ",
                     "models/clip_vision on http://127.0.0.1:", "(it has: ", CLIP_VISION):
        assert expected in done.stderr, done.stderr
    done = run_cli("stylediffusion_reedit_saved", "--target", TARGET, "--out", tmp_path,
                   "--set", "ForgeditInversionLoad.file=nope.safetensors", servers=[server.url])
    assert done.returncode == 1
    for expected in ("(ForgeditInversionLoad), input file: no file 'nope.safetensors' in ",
                     "models/stylediffusion on http://127.0.0.1:"):
        assert expected in done.stderr, done.stderr
    done = run_cli("stylediffusion_reedit_saved", "--target", TARGET, "--source", SOURCE, "--out", tmp_path,
                   servers=[server.url])
    assert done.returncode == 1
    assert "--source: no Forgedit node in this workflow has a typed source_prompt" in done.stderr, done.stderr
    assert pngs(tmp_path) == [] and server.get("/queue") == {"queue_running": [], "queue_pending": []}


def test_a_failing_edit_names_the_p2p_node(stylediffusion_run, server, tmp_path):
    done = run_small(server, "stylediffusion_reedit_saved", tmp_path, target="a tiger")
    assert done.returncode == 1 and pngs(tmp_path) == []
    assert "'Forgedit P2P / P2Plus Edit' (ForgeditP2PEdit) failed: ValueError: replace needs the same number of " \
           "words in both prompts" in done.stderr, done.stderr


BAD = {
    "no image file": ([], ["node 2 'Load Image' (LoadImage), input image", "Invalid image file: example.png"]),
    "unknown checkpoint": (["--checkpoint", "nope.safetensors"],
                           ["a model file the workflow names is missing (nothing was queued)",
                            "node 1 'Load Checkpoint' (CheckpointLoaderSimple), input ckpt_name: no file "
                            "'nope.safetensors' in ", "models/checkpoints on http://127.0.0.1:",
                            f"(it has: {CHECKPOINT}"]),  # and the SD 2.x checkpoint once its test ran
    "malformed gammas": (["--set", "ForgeditInterpolate.gammas=0.5, abc"],
                         ["(ForgeditInterpolate), input gammas: Custom validation failed for node: gammas - gammas: "
                          "cannot read 'abc'"]),
    "too many gammas": (["--set", "ForgeditInterpolate.gammas=0:100:0.1"],
                        ["(ForgeditInterpolate), input gammas: Custom validation failed for node: gammas - gammas has "
                         "1001 values; at most 256"]),
    "empty alpha in vp": (["--set", "ForgeditInterpolate.mode=vp", "--set", "ForgeditInterpolate.alphas=0.7,,0.9"],
                          ["(ForgeditInterpolate), input alphas: Custom validation failed for node: alphas - alphas: "
                           "item 2 of '0.7,,0.9' is empty"]),
    "unknown input": (["--set", "KSampler.gamma=1"], ["node 11 (KSampler) has no value input 'gamma'"]),
    "empty source prompt": (["--set", "ForgeditFinetune.source_prompt= "],
                            ["(ForgeditFinetune), input source_prompt: Custom validation failed for node: source_prompt "
                             "- source_prompt is empty"]),
    "unknown precision": (["--set", "ForgeditFinetune.precision=fastest"],
                          ["(ForgeditFinetune), input precision", "precision 'fastest' is not one of: auto, exact"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_name_the_node_and_the_server_goes_on(case, server, photos, tmp_path):
    args, expected = BAD[case]
    image = [] if case == "no image file" else ["--image", photos[1]]
    done = run_cli("forgedit_single_gamma_ksampler", *image, "--target", "a blue square", "--out", tmp_path,
                   *SMALL["forgedit_single_gamma_ksampler"], *args, servers=[server.url])
    assert done.returncode != 0
    assert all(e in done.stderr for e in expected), done.stdout + done.stderr
    assert server.get("/queue") == {"queue_running": [], "queue_pending": []}


def test_a_rejected_prompt_is_an_http_400_with_node_errors(server, object_info):
    prompt, _ = run.convert(load_workflow("forgedit_single_gamma_ksampler"), object_info)
    with pytest.raises(urllib.error.HTTPError) as e:
        server.post("/prompt", {"prompt": prompt})
    body = json.loads(e.value.read())
    assert e.value.code == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    errors = {i: {(x["extra_info"]["input_name"], x["type"]) for x in v["errors"]}
              for i, v in body["node_errors"].items()}
    assert errors == {"1": {("ckpt_name", "value_not_in_list")}, "2": {("image", "custom_validation_failed")}}


def test_a_bad_gamma_list_is_an_http_400_before_anything_trains(server, object_info, photos):
    prompt, primitives = run.convert(load_workflow("forgedit_single_gamma_ksampler"), object_info)
    for assignment in (f"CheckpointLoaderSimple.ckpt_name={CHECKPOINT}", "ForgeditInterpolate.gammas=0.5,,0.7"):
        run.set_input(prompt, primitives, object_info, assignment)
    run.set_class_input(prompt, {"LoadImage": "image"}, run.upload_image(server.url, photos[0]), "--image")
    history = server.get("/history")
    with pytest.raises(urllib.error.HTTPError) as e:
        server.post("/prompt", {"prompt": prompt})
    body = json.loads(e.value.read())
    interpolate = next(i for i, n in prompt.items() if n["class_type"] == "ForgeditInterpolate")
    assert e.value.code == 400 and list(body["node_errors"]) == [interpolate]
    errors = {e["extra_info"]["input_name"]: e["details"] for e in body["node_errors"][interpolate]["errors"]}
    assert "item 2 of '0.5,,0.7' is empty" in errors["gammas"]  # ComfyUI files it under each input validate_inputs takes
    assert server.get("/history") == history and server.get("/queue") == {"queue_running": [], "queue_pending": []}


def test_interrupt_stops_a_finetune_and_the_next_prompt_runs(server, object_info, photos, tmp_path):
    prompt, primitives = run.convert(load_workflow("forgedit_single_gamma_ksampler"), object_info)
    for assignment in ("width.value=64", "height.value=64", "ForgeditFinetune.samples=400", "KSampler.steps=2",
                       "ForgeditFinetune.batch_size=2", f"ForgeditFinetune.seed={time.time_ns()}",
                       f"CheckpointLoaderSimple.ckpt_name={CHECKPOINT}"):
        run.set_input(prompt, primitives, object_info, assignment)
    run.set_class_input(prompt, {"LoadImage": "image"}, run.upload_image(server.url, photos[0]), "--image")
    tune = next(i for i, n in prompt.items() if n["class_type"] == "ForgeditFinetune")
    ws = run.WebSocket(server.url, "interrupt-test")
    try:
        prompt_id = run.queue_prompt(server.url, prompt, "interrupt-test")
        end = time.monotonic() + 120
        while True:  # until the fine-tune has made its first step
            assert time.monotonic() < end, "the fine-tune made no step within 120 s"
            try:
                message = ws.receive(5)
            except TimeoutError:
                continue
            if isinstance(message, str) and json.loads(message)["type"] == "progress" \
                    and json.loads(message)["data"]["node"] == tune:
                break
        server.post("/interrupt", {})
        entry = run.follow(server.url, ws, prompt, prompt_id, lambda line: None, timeout=120)
    finally:
        ws.close()
    assert entry["status"]["status_str"] == "error"
    interrupted = [d for kind, d in entry["status"]["messages"] if kind == "execution_interrupted"]
    assert [d["node_id"] for d in interrupted] == [tune]
    assert run.failure(prompt, entry).startswith(f"interrupted at node {tune} 'Forgedit Fine-tune'")
    done = run_small(server, "forgedit_single_gamma_ksampler", tmp_path, image=photos[0], target="a sitting dog")
    assert done.returncode == 0, done.stdout + done.stderr


def test_batch_spreads_the_edits_over_two_servers(server, models, photos, tmp_path_factory):
    second = Server(tmp_path_factory.mktemp("comfyui2"), models)
    try:
        second.wait()
        folder = tmp_path_factory.mktemp("batch")
        rows = [(photos[0], "a blue disc", "0.5", "decoderattn"), (photos[1], "a sitting dog", "0.7", "encoderattn"),
                (photos[0], "a green disc", "0.6", ""), (photos[1], "a red square", "", "noencoder")]
        for p in photos:
            shutil.copy(p, folder / p.name)
        with open(folder / "edits.csv", "w", newline="") as f:
            csv.writer(f).writerows([("image", "target", "gamma", "strategy")] + [(p.name, *rest) for p, *rest in rows])
        before = set(server.get("/history"))
        out = folder / "out"
        done = run_cli("forgedit_single_gamma_ksampler", "--batch", folder / "edits.csv", "--out", out,
                       *SMALL["forgedit_single_gamma_ksampler"], servers=[server.url, second.url])
        assert done.returncode == 0, done.stdout + done.stderr
        assert sorted(p.parent.name for p in pngs(out)) == ["001-a-blue-disc", "002-a-sitting-dog", "003-a-green-disc",
                                                            "004-a-red-square"]
        ran = {"first": [e for i, e in server.get("/history").items() if i not in before],
               "second": list(second.get("/history").values())}
        assert len(ran["first"]) >= 1 and len(ran["second"]) >= 1 and len(ran["first"]) + len(ran["second"]) == 4
        settings = set()
        for entry in ran["first"] + ran["second"]:
            assert entry["status"]["status_str"] == "success"
            nodes = {n["_meta"]["title"]: n["inputs"] for n in entry["prompt"][2].values()}
            settings.add((nodes["Target prompt"]["text"], nodes["Forgedit Interpolate"]["gammas"],
                          nodes["Forgedit Forget"]["strategy"]))
        assert settings == {("a blue disc", "0.5", "decoderattn"), ("a sitting dog", "0.7", "encoderattn"),
                            ("a green disc", "0.6", "donotforget"), ("a red square", "0.6", "noencoder")}
    finally:
        second.stop()


# --- failures inside run.py, --timeout --------------------------------------------------------------------------------

def test_a_crash_inside_run_py_exits_non_zero_and_is_listed(server, photos, tmp_path, monkeypatch, capsys):
    def broken(*args):
        raise KeyError("injected")

    monkeypatch.setattr(run, "check_model_files", broken)
    args = ["--image", photos[1], "--target", "a blue square", "--out", tmp_path, "--server", server.url,
            *SMALL["forgedit_single_gamma_ksampler"]]
    assert run.main([str(WORKFLOWS / "forgedit_single_gamma_ksampler.json"), *map(str, args)]) == 1
    assert "run.py crashed: KeyError: 'injected'" in capsys.readouterr().err
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(photos[0], folder / "photo.png")
    (folder / "edits.csv").write_text("image,target\nphoto.png,a blue disc\nphoto.png,a green disc\n")
    batch = [str(WORKFLOWS / "forgedit_single_gamma_ksampler.json"), "--batch", str(folder / "edits.csv"),
             "--server", server.url]
    assert run.main(batch) == 1
    err = capsys.readouterr().err
    assert "2 of 2 edits failed:" in err and err.count("run.py crashed: KeyError") == 4, err  # each, then the list
    assert server.get("/queue") == {"queue_running": [], "queue_pending": []}


def test_timeout_cancels_the_edit(server, photos, tmp_path):
    done = run_small(server, "forgedit_single_gamma_ksampler", tmp_path, "--set", "ForgeditFinetune.samples=4000",
                     "--set", f"ForgeditFinetune.seed={time.time_ns() % 10**9}", "--timeout", "3",
                     image=photos[0], target="a sitting dog")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "timed out after 3 s (--timeout); the prompt" in done.stderr and "was cancelled" in done.stderr
    wait_until(lambda: server.get("/queue") == {"queue_running": [], "queue_pending": []}, 120,
               "the cancelled prompt left the queue")
    assert pngs(tmp_path) == []


# --- no --server: run.py starts its own ComfyUI -----------------------------------------------------------------------

@pytest.fixture
def local(models, tmp_path, monkeypatch):
    """run.py's local-server options for a throwaway base directory with the test models (not the user's folders),
    kept-server records in tmp_path; nothing may answer at 127.0.0.1:8188 (run.py would use it)."""
    assert not run.answers(run.DEFAULT_SERVER), "something answers at 127.0.0.1:8188: these tests need it free"
    base = prepare_base(tmp_path / "base", models)
    env = {**os.environ, "FORGEDIT_STATE_DIR": str(tmp_path / "state")}
    (tmp_path / "state").mkdir()
    options = ["--comfyui", comfyui_path(), f"--comfyui-args={' '.join(SERVER_ARGS)} --base-directory {base}"]
    return options, env, tmp_path / "state"


def started_pid(stdout: str) -> int:
    found = re.search(r"starting ComfyUI .* \(pid (\d+)\) at (http://\S+),", stdout)
    assert found, stdout
    return int(found.group(1))


def test_without_a_server_run_py_starts_comfyui_and_stops_it(local, photos, tmp_path):
    options, env, state = local
    out = tmp_path / "out"
    done = run_cli("forgedit_single_gamma_ksampler", "--image", photos[1], "--target", "a blue square", "--out", out,
                   *SMALL["forgedit_single_gamma_ksampler"], *options, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    pid = started_pid(done.stdout)
    assert [Image.open(p).size for p in pngs(out)] == [(64, 64)]
    assert "KSampler: step 2/2 [####################]" in done.stdout
    assert f"stopped ComfyUI (pid {pid})" in done.stdout
    assert not run.alive(pid) and list(state.iterdir()) == []


def test_keep_server_is_reused_and_does_not_retrain(local, photos, tmp_path):
    options, env, state = local
    first = run_cli("forgedit_single_gamma_ksampler", "--image", photos[1], "--target", "a blue square",
                    "--out", tmp_path / "first", *SMALL["forgedit_single_gamma_ksampler"], *options, "--keep-server",
                    env=env)
    pid = started_pid(first.stdout)
    try:
        assert first.returncode == 0, first.stdout + first.stderr
        assert run.alive(pid) and "Forgedit Fine-tune: step 2/2" in first.stdout
        record, = state.glob("*.json")
        kept = json.loads(record.read_text())
        assert kept["pid"] == pid
        again = run_cli("forgedit_single_gamma_ksampler", "--image", photos[1], "--target", "a green square",
                        "--out", tmp_path / "again", *SMALL["forgedit_single_gamma_ksampler"], *options,
                        "--keep-server", env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"using the ComfyUI kept running at {kept['url']} (pid {pid}" in again.stdout
        assert "starting ComfyUI" not in again.stdout and "Forgedit Fine-tune: step" not in again.stdout
        assert len(pngs(tmp_path / "again")) == 1
        history = run.get_json(kept["url"], "/history")
        last = max(history.values(), key=lambda e: e["prompt"][0])
        tune = next(i for i, n in last["prompt"][2].items() if n["class_type"] == "ForgeditFinetune")
        cached = [d["nodes"] for kind, d in last["status"]["messages"] if kind == "execution_cached"]
        assert cached and tune in cached[0], last["status"]
        stopped = subprocess_run_stop(options, env)
        assert stopped.returncode == 0 and f"stopped ComfyUI (pid {pid})" in stopped.stdout, stopped.stdout
        assert not run.alive(pid) and list(state.iterdir()) == []
    finally:
        if run.alive(pid):
            run.stop_process(pid)


def subprocess_run_stop(options, env):
    return subprocess.run([sys.executable, str(PACK / "run.py"), "--stop-server", *map(str, options)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_a_comfyui_that_fails_to_start_shows_its_log(local, photos, tmp_path):
    options, env, state = local
    options = [*options[:-1], options[-1] + " --no-such-option"]
    done = run_cli("forgedit_single_gamma_ksampler", "--image", photos[1], "--target", "a blue square",
                   "--out", tmp_path / "out", *options, "--start-timeout", "120", env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    pid = started_pid(done.stdout)
    assert "ComfyUI exited with status 2 while starting; the end of its log" in done.stderr, done.stderr
    assert "unrecognized arguments: --no-such-option" in done.stderr
    assert not run.alive(pid) and not (tmp_path / "out").exists()
