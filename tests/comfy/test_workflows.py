"""The shipped workflows in a real ComfyUI server on CPU: the template browser lists them, the committed /object_info
snapshot the offline converter tests use (tests/ops/data/object_info.json) still equals the server's, and (where
Chromium is installed) the real frontend loads and re-saves each workflow unchanged and exports the API prompt run.py
makes."""
import asyncio
import base64
import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

from find_comfyui import PACK
from servers import (  # noqa: F401  fixtures: alexnet, blip_root, checkpoint, clip_vision, models, object_info, server
    NAMES, WORKFLOWS, alexnet, blip_root, checkpoint, clip_vision, load_workflow, models, object_info, run, server)

SNAPSHOT = PACK / "tests" / "ops" / "data" / "object_info.json"
FILE_LISTS = {("LoadImage", "image"), ("ForgeditLoad", "file"), ("ForgeditImageEncoderLoader", "clip_name"),
              ("ForgeditInversionLoad", "file"), ("ForgeditStyleDiffusionImport", "pth_file"),
              ("ForgeditNSLPIPS", "trunk_file"), ("ForgeditNSLPIPS", "lin_file")}  # the folders' files today


def comparable(info: dict) -> dict:
    """object_info of every node of the shipped workflows and every Forgedit node, the file lists that change from run
    to run emptied."""
    used = {n["type"] for name in NAMES for n in load_workflow(name)["nodes"]} - run.workflow_api.FRONTEND_ONLY
    keep = {c: json.loads(json.dumps(info[c])) for c in sorted(used | {c for c in info if c.startswith("Forgedit")})}
    for (cls, name) in FILE_LISTS:
        inputs = keep[cls]["input"]
        spec = inputs["required"][name] if name in inputs["required"] else inputs["optional"][name]
        if isinstance(spec[0], list):
            spec[0] = []
        else:
            spec[1]["options"] = []
    return keep


def test_the_template_browser_lists_the_workflows(server):
    assert sorted(server.get("/workflow_templates")["forgedit"]) == sorted(NAMES)
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(NAMES)
    served = server.get("/api/workflow_templates/forgedit/forgedit_vanilla.json")
    assert served == load_workflow("forgedit_vanilla")


def test_the_object_info_snapshot_is_the_servers(object_info):
    """FORGEDIT_WRITE_SNAPSHOT=1 rewrites the snapshot from this server (after changing a node's inputs)."""
    live = comparable(object_info)
    if os.environ.get("FORGEDIT_WRITE_SNAPSHOT") == "1":
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(json.dumps(live, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    assert json.loads(SNAPSHOT.read_text(encoding="utf-8")) == live, \
        "the node inputs changed: rerun this test with FORGEDIT_WRITE_SNAPSHOT=1, commit tests/ops/data/object_info.json"


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
        for _ in range(120):  # 60 s at most
            if (profile / "DevToolsActivePort").is_file() and (profile / "DevToolsActivePort").read_text().strip():
                break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError("Chromium did not open its DevTools port within 60 s")
        port = (profile / "DevToolsActivePort").read_text().split()[0]
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        results = {}
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"],
                                   max_msg_size=0) as ws:
            page = DevTools(ws)
            await page.call("Runtime.enable")
            await page.call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1,
                            mobile=False)
            await page.call("Page.navigate", url=url)
            for _ in range(240):  # 120 s at most
                if await page.js("!!window.app?.graph && typeof LiteGraph !== 'undefined' && "
                                 "'ForgeditFinetune' in LiteGraph.registered_node_types"):
                    break
                await asyncio.sleep(0.5)
            else:
                raise AssertionError("the frontend did not load the Forgedit nodes within 120 s")
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
        run.stop_process(browser.pid, browser, grace=30)


def thumbnail(screenshot: Path, jpeg: Path) -> None:
    """A workflow's template thumbnail from its 1600 x 1000 screenshot: the canvas without the tab bar and the side bar,
    900 px wide (Pillow's default bicubic), JPEG quality 82."""
    from PIL import Image

    Image.open(screenshot).convert("RGB").crop((64, 80, 1600, 1000)).resize((900, 539)).save(jpeg, quality=82)


def check_loaded(name: str, result: dict, object_info: dict, shots: Path) -> None:
    """One workflow as the frontend loaded it: no missing node, dialog or error; saved back unchanged; its API export
    equals run.py's conversion; a screenshot."""
    assert result["missing"] == [] and result["dialogs"] == [] and result["errors"] == [], (name, result)
    assert result["saved"] == load_workflow(name), f"the frontend saves {name} differently"
    ours, _ = run.convert(load_workflow(name), object_info)
    known = {i: {n for s in ("required", "optional") for n in object_info[v["class_type"]]["input"].get(s, {})}
             for i, v in ours.items()}  # the frontend also sends its display-only widgets (PreviewAny's preview)
    theirs = {i: {"class_type": v["class_type"], "inputs": {k: x for k, x in v["inputs"].items() if k in known[i]}}
              for i, v in result["api"].items()}
    assert theirs == {i: {"class_type": v["class_type"], "inputs": v["inputs"]} for i, v in ours.items()}, name
    assert (shots / f"{name}.png").stat().st_size > 10_000


def test_the_frontend_loads_each_workflow_unchanged(server, object_info, tmp_path):
    """Every workflow is checked (the failures listed together). FORGEDIT_WRITE_THUMBNAILS=1 also rewrites each passing
    workflow's workflows/<name>.jpg from its screenshot (after changing its layout); FORGEDIT_WRITE_THUMBNAILS=name,name
    only those."""
    shots = PACK / "out" / "screenshots"  # kept as the test's artifact (git-ignored)
    shots.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(load_in_browser(server.url, tmp_path / "profile", NAMES, shots))
    write, failures = os.environ.get("FORGEDIT_WRITE_THUMBNAILS", ""), []
    for name, result in results.items():
        try:
            check_loaded(name, result, object_info, shots)
        except AssertionError as e:
            failures.append(f"{name}: {e}")
            continue
        if write == "1" or name in write.split(","):
            thumbnail(shots / f"{name}.png", WORKFLOWS / f"{name}.jpg")
    assert not failures, "\n\n".join(failures)
