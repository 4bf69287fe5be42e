"""run.py end to end against real ComfyUI servers on CPU: the shipped workflows run, bad inputs come back as node errors
(a missing model file before anything is queued), an interrupt or --timeout stops a fine-tune, a crash inside run.py
exits non-zero, --batch spreads edits over two servers, and without --server run.py starts its own ComfyUI, stops it,
or keeps it for the next call (which then does not retrain)."""
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
from servers import (  # noqa: F401  the fixtures used here: blip_root, checkpoint, models, object_info, photos, server
    CHECKPOINT, IMAGES, SERVER_ARGS, SMALL, WORKFLOWS, Server, blip_root, checkpoint, load_workflow, models,
    object_info, photos, pngs, prepare_base, run, run_cli, run_small, server, wait_until)


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


def test_single_gamma_ksampler_workflow_runs(server, photos, tmp_path):
    done = run_small(server, "forgedit_single_gamma_ksampler", tmp_path, image=photos[1], target="a blue square")
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()
    assert [Image.open(p).size for p in pngs(tmp_path)] == [(64, 64)]
    assert "KSampler: step 2/2" in done.stdout


BAD = {
    "no image file": ([], ["node 2 'Load Image' (LoadImage), input image", "Invalid image file: example.png"]),
    "unknown checkpoint": (["--checkpoint", "nope.safetensors"],
                           ["a model file the workflow names is missing (nothing was queued)",
                            "node 1 'Load Checkpoint' (CheckpointLoaderSimple), input ckpt_name: no file "
                            "'nope.safetensors' in ", "models/checkpoints on http://127.0.0.1:",
                            f"(it has: {CHECKPOINT})"]),
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
