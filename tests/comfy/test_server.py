"""End to end through a real ComfyUI server on CPU: the shipped workflows run through run.py, the template browser lists
them, --batch spreads edits over two servers, bad inputs come back as node errors, an interrupt stops a fine-tune, and
(where Chromium is installed) the real frontend loads and re-saves each workflow unchanged. The server gets this pack as
its only custom node, a random SD1.5-layout checkpoint and a tiny random BLIP."""
import asyncio
import base64
import csv
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from find_comfyui import PACK, comfyui_path
from PIL import Image, ImageDraw
from test_caption import blip_root  # noqa: F401  the tiny random BLIP folder (a session fixture)

WORKFLOWS = PACK / "workflows"
NAMES = ["forgedit_vanilla", "forgedit_reedit_saved", "forgedit_single_gamma_ksampler", "imagic", "forgedit_imagic",
         "dreambooth_forgedit"]
CHECKPOINT = "shallow_sd15.safetensors"
TRAIN = ["--set", "ForgeditFinetune.samples=4", "--set", "ForgeditFinetune.batch_size=2"]
SAMPLE = ["--set", "ForgeditSampler.steps=2", "--set", "ForgeditSampler.gammas=0.6, 0.8", "--set",
          "ForgeditSampler.seeds=0", "--set", "ForgeditSampler.batch_size=2"]
SMALL = {  # CPU-sized settings for each workflow: 64 x 64, 2 training steps, 2 sampling steps
    "forgedit_vanilla": [*TRAIN, "--set", "ForgeditFinetune.width=64", "--set", "ForgeditFinetune.height=64",
                         "--set", "ForgeditCaption.blip_model=tiny-blip", "--set", "ForgeditSampler.steps=2",
                         "--set", "ForgeditSampler.gammas=0.5, 0.7", "--set", "ForgeditSampler.seeds=0, 1",
                         "--set", "ForgeditSampler.batch_size=2"],
    "forgedit_reedit_saved": ["--set", "ForgeditSampler.steps=2", "--set", "ForgeditSampler.gammas=0.4:0.8:0.2",
                              "--set", "ForgeditSampler.seeds=3", "--set", "Forgedit Sampler.batch_size=2"],
    "forgedit_single_gamma_ksampler": [*TRAIN, "--set", "width.value=64", "--set", "height.value=64",
                                       "--set", "KSampler.steps=2"],
    "imagic": ["--set", "ForgeditImagic.text_steps=2", "--set", "ForgeditImagic.unet_steps=2", "--set",
               "ForgeditImagic.width=64", "--set", "ForgeditImagic.height=64", *SAMPLE],
    "forgedit_imagic": ["--set", "ForgeditImagic.text_steps=2", "--set", "ForgeditImagic.unet_steps=2", "--set",
                        "ForgeditImagic.width=64", "--set", "ForgeditImagic.height=64", *SAMPLE],
    "dreambooth_forgedit": ["--set", "ForgeditDreamBooth.samples=4", "--set", "ForgeditDreamBooth.batch_size=2",
                            "--set", "ForgeditDreamBooth.width=64", "--set", "ForgeditDreamBooth.height=64",
                            "--set", "ForgeditCaption.blip_model=tiny-blip", *SAMPLE],
}
IMAGES = {"forgedit_vanilla": 1 + 4, "forgedit_reedit_saved": 1 + 3, "forgedit_single_gamma_ksampler": 1}


def load_run():
    """run.py as a module (it is a script at the pack root, not part of the package)."""
    spec = importlib.util.spec_from_file_location("forgedit_run", PACK / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = load_run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python main.py --cpu` in a throwaway base directory whose custom_nodes/ holds only this pack (a symlink)."""

    def __init__(self, base: Path, models: dict[str, Path]):
        for folder in ("custom_nodes", "models/checkpoints", "models/blip", "models/forgedit", "input", "output"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / "forgedit").symlink_to(PACK, target_is_directory=True)
        for relative, target in models.items():
            (base / relative).symlink_to(target)
        settings = base / "user" / "default" / "comfy.settings.json"  # no first-run tutorial in the browser test
        settings.parent.mkdir(parents=True)
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}))
        self.base, self.port = base, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(base / "server.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-api-nodes", "--base-directory", str(base), "--database-url", "sqlite:///:memory:"],
            cwd=comfyui_path(), stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 120) -> None:
        """Until /object_info answers (10-15 s on one core)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.process.poll() is None, f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}"
            try:
                if "ForgeditFinetune" in self.get("/object_info"):
                    return
            except (OSError, ValueError):
                time.sleep(0.5)
        raise AssertionError(f"ComfyUI did not come up within {timeout} s:\n{self.log_tail()}")

    def get(self, path: str):
        return run.get_json(self.url, path)

    def post(self, path: str, body: dict):
        return run.post_json(self.url, path, body)

    def log_tail(self, lines: int = 40) -> str:
        self.log.flush()
        return "\n".join((self.base / "server.log").read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def checkpoint(comfy, tmp_path_factory) -> Path:
    """The random shallow SD1.5 checkpoint file, written once (0.48 GB)."""
    from checkpoint_file import write_shallow_sd15

    path = tmp_path_factory.mktemp("checkpoints") / CHECKPOINT
    write_shallow_sd15(path)
    return path


@pytest.fixture(scope="module")
def models(checkpoint, blip_root) -> dict[str, Path]:  # noqa: F811
    return {f"models/checkpoints/{CHECKPOINT}": checkpoint, "models/blip/tiny-blip": blip_root / "tiny-blip"}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """One ComfyUI server shared by the tests of this module."""
    s = Server(tmp_path_factory.mktemp("comfyui"), models)
    try:
        s.wait()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Two small 'photos': a red disc and a yellow square on gradients."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, (shape, colour) in enumerate((("ellipse", (220, 40, 40)), ("rectangle", (230, 200, 40)))):
        ramp = np.linspace(0, 1, 96)[None, :, None] * np.array([40, 90, 200]) + np.linspace(0, 60, 72)[:, None, None]
        image = Image.fromarray(ramp.clip(0, 255).astype(np.uint8))
        getattr(ImageDraw.Draw(image), shape)((24, 14, 70, 58), fill=colour)
        paths.append(folder / f"photo{i}.png")
        image.save(paths[-1])
    return paths


def run_cli(workflow: str, *args, servers=(), cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """python run.py workflows/<workflow>.json ... as a user types it."""
    command = [sys.executable, str(PACK / "run.py"), str(WORKFLOWS / f"{workflow}.json"), "--checkpoint", CHECKPOINT]
    for url in servers:
        command += ["--server", url]
    return subprocess.run(command + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_small(server, workflow: str, out: Path, *args, image=None, target="a sitting dog"):
    extra = ["--image", image] if image else []
    return run_cli(workflow, *extra, "--target", target, "--out", out, *SMALL[workflow], *args, servers=[server.url])


@pytest.fixture(scope="module")
def vanilla_run(server, photos, tmp_path_factory):
    """The vanilla workflow once (caption, fine-tune, forget, γ sweep, save); the re-edit test loads its result."""
    out = tmp_path_factory.mktemp("vanilla_out")
    return run_small(server, "forgedit_vanilla", out, image=photos[0]), out


# --- the shipped files -----------------------------------------------------------------------------------------------

def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def test_the_template_browser_lists_the_workflows(server):
    assert sorted(server.get("/workflow_templates")["forgedit"]) == sorted(NAMES)
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(NAMES)
    served = server.get("/api/workflow_templates/forgedit/forgedit_vanilla.json")
    assert served == load_workflow("forgedit_vanilla")


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
    assert all(word in text for word in ("encoderattn", "decoderattn", "0.5", "0.7", "1.0", "1.4", "Load Checkpoint"))
    for n in wf["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                "widgets_values"} <= set(n)
        if n["type"] in ("MarkdownNote", "PrimitiveNode"):
            continue
        assert n["properties"] == {"Node name for S&R": n["type"]}
        expected = sum(1 + extra for _, extra in run.widget_inputs(object_info[n["type"]]))
        assert len(n["widgets_values"]) == expected, n["type"]
        outputs = object_info[n["type"]]
        assert [(o["name"], o["type"]) for o in n["outputs"]] == list(zip(outputs["output_name"], outputs["output"]))
    thumbnail = WORKFLOWS / f"{name}.jpg"
    assert thumbnail.stat().st_size < 100_000 and Image.open(thumbnail).format == "JPEG"


def test_conversion_maps_widgets_positionally_and_skips_frontend_extras(object_info):
    prompt, primitives = run.convert(load_workflow("forgedit_single_gamma_ksampler"), object_info)
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
    run.set_input(prompt, primitives, object_info, "width.value=64")
    assert finetune["width"] == by_class["EmptyLatentImage"]["inputs"]["width"] == 64 and finetune["height"] == 512
    vanilla, _ = run.convert(load_workflow("forgedit_vanilla"), object_info)
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
    prompt, _ = run.convert(wf, object_info)
    ksampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")["inputs"]
    assert ksampler["model"] == [str(nodes["ForgeditForget"]["id"]), 0]
    # bypassed Forget: its MODEL input (the checkpoint) passes through
    nodes["ForgeditForget"]["mode"] = run.BYPASSED
    prompt, _ = run.convert(wf, object_info)
    assert str(nodes["ForgeditForget"]["id"]) not in prompt
    ksampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")["inputs"]
    assert ksampler["model"] == [str(nodes["CheckpointLoaderSimple"]["id"]), 0]
    # bypassed Interpolate: its CONDITIONING input (the target prompt) passes through, as the frontend does it
    nodes["ForgeditInterpolate"]["mode"] = run.BYPASSED
    prompt, _ = run.convert(wf, object_info)
    ksampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")["inputs"]
    assert ksampler["positive"] == [str(next(n["id"] for n in wf["nodes"] if n.get("title") == "Target prompt")), 0]
    # bypassed VAE Decode: no IMAGE input to pass on -> a clear error; muted, it is dropped with what it feeds
    nodes["VAEDecode"]["mode"] = run.BYPASSED
    with pytest.raises(run.RunError, match=r"node \d+ 'VAE Decode' \(VAEDecode\) is bypassed but has no IMAGE input"):
        run.convert(wf, object_info)
    nodes["VAEDecode"]["mode"] = run.MUTED
    prompt, _ = run.convert(wf, object_info)
    assert "VAEDecode" not in {n["class_type"] for n in prompt.values()}
    assert "images" not in next(n for n in prompt.values() if n["class_type"] == "SaveImage")["inputs"]
    nodes["VAEDecode"]["mode"] = 0
    nodes["VAEDecode"]["type"] = "NoSuchNode"
    with pytest.raises(run.RunError, match="NoSuchNode, which this server does not have"):
        run.convert(wf, object_info)


# --- end to end ------------------------------------------------------------------------------------------------------

def pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


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
                           ["(CheckpointLoaderSimple), input ckpt_name", "'nope.safetensors' not in"]),
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
        while True:  # until the fine-tune has made its first step
            try:
                message = ws.receive()
            except TimeoutError:
                continue
            if isinstance(message, str) and json.loads(message)["type"] == "progress" \
                    and json.loads(message)["data"]["node"] == tune:
                break
        server.post("/interrupt", {})
        entry = run.follow(server.url, ws, prompt, prompt_id, lambda line: None)
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


# --- the real frontend (headless Chromium over the DevTools protocol) -------------------------------------------------

LOAD = """(async () => {
  const wf = %s;
  await app.loadGraphData(structuredClone(wf), true, true, %s);
  await new Promise(r => setTimeout(r, 500));
  return {missing: wf.nodes.map(n => n.type).filter(t => !LiteGraph.registered_node_types[t]),
          saved: app.graph.serialize(), api: (await app.graphToPrompt()).output,
          dialogs: [...document.querySelectorAll('.p-dialog, .p-toast-message')].map(d => d.innerText)};
})()"""


class DevTools:
    """Just enough of the Chrome DevTools protocol: call a method, evaluate JavaScript, keep the events."""

    def __init__(self, ws):
        self.ws, self.calls, self.events = ws, 0, []

    async def call(self, method: str, **params):
        self.calls += 1
        await self.ws.send_json({"id": self.calls, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self.ws.receive_json(), 120)
            if message.get("id") == self.calls:
                assert "error" not in message, message
                return message["result"]
            self.events.append(message)

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")


async def load_in_browser(url: str, profile: Path, names: list[str], shots: Path) -> dict:
    """Open the server's frontend in headless Chromium, load each workflow as a template is loaded, screenshot it."""
    import aiohttp

    browser = subprocess.Popen([shutil.which("chromium"), "--headless=new", "--no-sandbox", "--disable-gpu",
                                "--no-first-run", "--disable-quic", "--disable-background-networking",
                                "--disable-component-update", "--disable-sync", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            if (profile / "DevToolsActivePort").is_file() and (profile / "DevToolsActivePort").read_text().strip():
                break
            await asyncio.sleep(0.5)
        port = (profile / "DevToolsActivePort").read_text().split()[0]
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
        results = {}
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"],
                                   max_msg_size=0) as ws:
            page = DevTools(ws)
            await page.call("Runtime.enable")
            await page.call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1,
                            mobile=False)
            await page.call("Page.navigate", url=url)
            for _ in range(240):
                if await page.js("!!window.app?.graph && typeof LiteGraph !== 'undefined' && "
                                 "'ForgeditFinetune' in LiteGraph.registered_node_types"):
                    break
                await asyncio.sleep(0.5)
            for name in names:
                page.events.clear()
                workflow = (WORKFLOWS / f"{name}.json").read_text(encoding="utf-8")
                results[name] = await page.js(LOAD % (workflow, json.dumps(f"{name}.json")))
                results[name]["errors"] = [e["params"] for e in page.events if e["method"] == "Runtime.exceptionThrown"
                                           or e["method"] == "Runtime.consoleAPICalled"
                                           and e["params"]["type"] == "error"]
                await page.js("app.extensionManager.command.execute('Comfy.Canvas.FitView')")
                await asyncio.sleep(0.5)
                shot = await page.call("Page.captureScreenshot", format="png")
                (shots / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
        return results
    finally:
        browser.terminate()
        browser.wait()


def test_the_frontend_loads_each_workflow_unchanged(server, object_info, tmp_path):
    shots = PACK / "out" / "screenshots"  # kept as the test's artifact (git-ignored)
    shots.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(load_in_browser(server.url, tmp_path / "profile", NAMES, shots))
    for name, result in results.items():
        assert result["missing"] == [] and result["dialogs"] == [] and result["errors"] == [], (name, result)
        assert result["saved"] == load_workflow(name), f"the frontend saves {name} differently"
        ours, _ = run.convert(load_workflow(name), object_info)
        known = {i: {n for s in ("required", "optional") for n in object_info[v["class_type"]]["input"].get(s, {})}
                 for i, v in ours.items()}  # the frontend also sends its display-only widgets (PreviewAny's preview)
        theirs = {i: {"class_type": v["class_type"], "inputs": {k: x for k, x in v["inputs"].items() if k in known[i]}}
                  for i, v in result["api"].items()}
        assert theirs == {i: {"class_type": v["class_type"], "inputs": v["inputs"]} for i, v in ours.items()}, name
        assert (shots / f"{name}.png").stat().st_size > 10_000
