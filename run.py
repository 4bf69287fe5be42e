#!/usr/bin/env python3
"""Run a shipped Forgedit workflow (UI format, as ComfyUI saves it) on ComfyUI: one it starts, or running servers.

    python run.py workflows/forgedit_vanilla.json --image dog.png --target "a sitting dog"
    python run.py workflows/forgedit_vanilla.json --batch edits.csv --server http://gpu1:8188 --server http://gpu2:8188
    python run.py workflows/nulltext_p2p.json --image cat.png --source "a cat on a rug" --target "a tiger on a rug"

Without --server, run.py uses the ComfyUI it kept running (--keep-server) or the one at 127.0.0.1:8188, else starts
the ComfyUI that holds this pack in custom_nodes/ (or --comfyui PATH, or $COMFYUI_PATH) and stops it afterwards.
The workflow is converted to an API prompt with the server's /object_info (workflow_api.py), the image is uploaded, the
prompt queued, progress is shown from the websocket and the images end up in --out. Standard library and aiohttp (a
ComfyUI requirement).
"""
import argparse
import asyncio
import csv
import hashlib
import importlib.util
import json
import mimetypes
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

PACK = Path(__file__).resolve().parent
DEFAULT_SERVER = "http://127.0.0.1:8188"
PRINT_LOCK = threading.Lock()


def _load_workflow_api():
    """workflow_api.py beside this file, under a name of its own (the pack root is no place for sys.path: its nodes/
    would shadow ComfyUI's nodes module in a process that imported ComfyUI)."""
    name = "forgedit_workflow_api"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PACK / "workflow_api.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


workflow_api = _load_workflow_api()
RunError, MUTED, BYPASSED = workflow_api.RunError, workflow_api.MUTED, workflow_api.BYPASSED
widget_inputs, input_spec, convert = workflow_api.widget_inputs, workflow_api.input_spec, workflow_api.convert
set_input, set_target, set_class_input = workflow_api.set_input, workflow_api.set_target, workflow_api.set_class_input
set_source, missing_model_files = workflow_api.set_source, workflow_api.missing_model_files
GAMMA_INPUTS = {"ForgeditInterpolate": "gammas", "ForgeditSampler": "gammas"}
TAUS = ("tau_v", "tau_c", "tau_s", "tau_u")  # Forgedit P2P / P2Plus Edit's attention-control windows (CSV columns)


def say(*lines: str, file=None) -> None:
    """Print whole lines at once (several worker threads share stdout)."""
    with PRINT_LOCK:
        print("\n".join(lines), file=file or sys.stdout, flush=True)


# --- HTTP ---------------------------------------------------------------------------------------------------------

def http(server: str, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 120) -> bytes:
    """GET (or POST when data is given) server+path and return the body; HTTP errors raise urllib's HTTPError."""
    request = urllib.request.Request(server.rstrip("/") + path, data, headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def get_json(server: str, path: str, timeout: float = 120):
    """GET a JSON document."""
    return json.loads(http(server, path, timeout=timeout))


def post_json(server: str, path: str, body: dict):
    """POST a JSON document and decode the JSON answer."""
    return json.loads(http(server, path, json.dumps(body).encode(), {"Content-Type": "application/json"}) or b"null")


def answers(server: str, timeout: float = 3) -> bool:
    """Whether a ComfyUI answers GET /system_stats there."""
    try:
        return "system" in get_json(server, "/system_stats", timeout)
    except (OSError, ValueError):
        return False


def upload_image(server: str, path: Path) -> str:
    """Upload an image to the server's input folder (POST /upload/image); returns the name LoadImage takes."""
    boundary = uuid.uuid4().hex
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            f"Content-Type: {kind}\r\n\r\n").encode()
    body = head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    answer = json.loads(http(server, "/upload/image", body, headers))
    return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]


# --- websocket (aiohttp, driven from the calling thread) -------------------------------------------------------------

class WebSocket:
    """ComfyUI's /ws for one client id, read synchronously: each worker thread runs its own small event loop."""

    def __init__(self, server: str, client_id: str, timeout: float = 30):
        import aiohttp

        self.timeout, self.loop = timeout, asyncio.new_event_loop()
        url = f"{server.rstrip('/')}/ws?clientId={client_id}"

        async def connect():
            session = aiohttp.ClientSession()
            try:
                return session, await session.ws_connect(url, max_msg_size=0)
            except BaseException:
                await session.close()
                raise
        try:
            self.session, self.ws = self.loop.run_until_complete(connect())
        except (aiohttp.ClientError, OSError) as e:
            self.loop.close()
            raise RunError(f"{server}: cannot open the websocket: {type(e).__name__}: {e}") from None

    def receive(self, timeout: float | None = None) -> str | bytes:
        """The next message: text as str, binary (previews) as bytes. TimeoutError when nothing came in time;
        ConnectionError once the server closed the connection."""
        import aiohttp

        message = self.loop.run_until_complete(self.ws.receive(timeout=timeout or self.timeout))
        if message.type == aiohttp.WSMsgType.TEXT:
            return message.data
        if message.type == aiohttp.WSMsgType.BINARY:
            return message.data
        raise ConnectionError(f"the server closed the websocket ({message.type.name})")

    def close(self) -> None:
        """Close the connection, the session and the loop."""
        async def close():
            await self.ws.close()
            await self.session.close()
        try:
            self.loop.run_until_complete(asyncio.wait_for(close(), 10))
        except (OSError, TimeoutError):
            pass
        finally:
            self.loop.close()


# --- a ComfyUI of our own ------------------------------------------------------------------------------------------

def find_comfyui(given: str | Path | None = None) -> Path | None:
    """The ComfyUI to start: --comfyui, else $COMFYUI_PATH, else the ComfyUI whose custom_nodes/ holds this pack."""
    candidates = [given, os.environ.get("COMFYUI_PATH")] if given else [os.environ.get("COMFYUI_PATH")]
    if PACK.parent.name == "custom_nodes":
        candidates.append(PACK.parent.parent)
    for c in filter(None, candidates):
        if (Path(c) / "main.py").is_file() and (Path(c) / "comfy").is_dir():
            return Path(c).resolve()
        if c == given:
            raise RunError(f"--comfyui {given}: not a ComfyUI folder (no main.py and comfy/ in it)")
    return None


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def option_value(args: list[str], name: str) -> str | None:
    """The value of a --name VALUE / --name=VALUE option in an argument list."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def pack_installed(comfyui: Path, comfyui_args: list[str]) -> bool:
    """Whether that ComfyUI loads this pack by itself (a folder or link to it in its custom_nodes/)."""
    nodes = Path(option_value(comfyui_args, "--base-directory") or comfyui) / "custom_nodes"
    return nodes.is_dir() and any(p.resolve() == PACK for p in nodes.iterdir() if p.is_dir())


def comfyui_command(comfyui: Path, port: int, comfyui_args: list[str], workdir: Path) -> list[str]:
    """`python main.py` for a local server on port. When the ComfyUI does not hold this pack, a custom_nodes folder in
    workdir links to it and an extra_model_paths file (ComfyUI's own mechanism, which also takes custom_nodes) adds
    that folder; models stay in the ComfyUI's default folders."""
    command = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), *comfyui_args]
    if not pack_installed(comfyui, comfyui_args):
        nodes = workdir / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        if not (nodes / "forgedit").exists():
            (nodes / "forgedit").symlink_to(PACK, target_is_directory=True)
        config = workdir / "forgedit_pack.yaml"
        config.write_text(f"forgedit_pack:\n  custom_nodes: {json.dumps(str(nodes))}\n", encoding="utf-8")
        command += ["--extra-model-paths-config", str(config)]
    return command


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_comfyui(comfyui: Path, comfyui_args: list[str], workdir: Path, port: int | None = None) -> subprocess.Popen:
    """Start ComfyUI (this Python, its own process group, output to workdir/comfyui.log); returns the process, with
    .url and .log set. Does not wait: see wait_ready."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "comfyui.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(comfyui_command(comfyui, port, comfyui_args, workdir), cwd=comfyui, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    process.url, process.log = f"http://127.0.0.1:{port}", log
    return process


def wait_ready(process: subprocess.Popen, deadline: float, needs: str = "ForgeditFinetune") -> None:
    """Until GET /object_info answers with the pack's nodes; RunError with the log's tail if the process exits or the
    deadline (seconds) passes."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RunError(f"ComfyUI exited with status {process.returncode} while starting; the end of its log "
                           f"({process.log}):\n{log_tail(process.log)}")
        try:
            info = get_json(process.url, "/object_info", timeout=30)
            if needs in info:
                return
            raise RunError(f"ComfyUI at {process.url} started without the Forgedit nodes; the end of its log "
                           f"({process.log}):\n{log_tail(process.log)}")
        except (OSError, ValueError):
            time.sleep(0.5)
    raise RunError(f"ComfyUI did not answer within {deadline:g} s; the end of its log ({process.log}):\n"
                   f"{log_tail(process.log)}")


def stop_process(pid: int, process: subprocess.Popen | None = None, grace: float = 20) -> None:
    """SIGTERM, then SIGKILL after grace seconds; only this pid."""
    if process is not None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + grace
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.2)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether a process runs with this pid (a zombie does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def state_file(comfyui: Path, comfyui_args: list[str]) -> Path:
    """Where a --keep-server ComfyUI is recorded: one file per ComfyUI folder and argument list, in
    $FORGEDIT_STATE_DIR or the temp folder."""
    key = hashlib.sha1("\0".join([str(comfyui), *comfyui_args]).encode()).hexdigest()[:12]
    return Path(os.environ.get("FORGEDIT_STATE_DIR") or tempfile.gettempdir()) / f"forgedit-comfyui-{key}.json"


def kept_server(state: Path) -> dict | None:
    """The recorded server if it still runs and answers; a stale record is removed."""
    try:
        kept = json.loads(state.read_text())
    except (OSError, ValueError):
        return None
    if alive(kept["pid"]) and answers(kept["url"], timeout=15):  # a busy server still answers, if slowly
        return kept
    state.unlink(missing_ok=True)
    return None


class LocalServer:
    """The server run.py uses when no --server is given: the kept one, the one at 127.0.0.1:8188, or a fresh one
    (stopped by close() unless kept)."""

    def __init__(self, args):
        self.process, self.workdir, self.url, self.keep = None, None, None, args.keep_server
        comfyui = find_comfyui(args.comfyui)
        comfyui_args = shlex.split(args.comfyui_args or "")
        state = state_file(comfyui, comfyui_args) if comfyui else None
        kept = kept_server(state) if state else None
        if kept:
            self.url = kept["url"]
            say(f"using the ComfyUI kept running at {self.url} (pid {kept['pid']}, log {kept['log']})")
            return
        if answers(DEFAULT_SERVER):
            self.url = DEFAULT_SERVER
            return
        if comfyui is None:
            raise RunError(f"nothing answers at {DEFAULT_SERVER} and there is no ComfyUI to start: pass --comfyui PATH "
                           "(or set COMFYUI_PATH, or put this pack into ComfyUI/custom_nodes/), or --server URL")
        if args.keep_server:
            self.workdir = state.with_suffix("")
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="forgedit-comfyui-"))
        self.process = start_comfyui(comfyui, comfyui_args, self.workdir)
        self.url = self.process.url
        say(f"starting ComfyUI {comfyui} (pid {self.process.pid}) at {self.url}, log {self.process.log}")
        try:
            wait_ready(self.process, args.start_timeout)
        except BaseException:
            self.close(stop=True)
            raise
        say(f"ComfyUI is ready at {self.url}")
        if args.keep_server:
            state.write_text(json.dumps({"pid": self.process.pid, "url": self.url, "log": str(self.process.log),
                                         "comfyui": str(comfyui), "args": comfyui_args}))
            say(f"keeping it running for the next call (recorded in {state}; stop it with --stop-server)")

    def close(self, stop: bool = False) -> None:
        """Stop the server this object started, unless it is kept (stop=True stops it anyway)."""
        if self.process is None or (self.keep and not stop):
            return
        stop_process(self.process.pid, self.process)
        say(f"stopped ComfyUI (pid {self.process.pid})")
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.process = None


def stop_kept_server(args) -> int:
    """--stop-server: stop the ComfyUI a --keep-server call left running for this ComfyUI and --comfyui-args."""
    comfyui = find_comfyui(args.comfyui)
    state = state_file(comfyui, shlex.split(args.comfyui_args or "")) if comfyui else None
    kept = json.loads(state.read_text()) if state and state.is_file() else None
    if kept is None:
        say("no kept ComfyUI is recorded for this ComfyUI and --comfyui-args")
        return 0
    stop_process(kept["pid"])
    state.unlink(missing_ok=True)
    shutil.rmtree(state.with_suffix(""), ignore_errors=True)
    say(f"stopped ComfyUI (pid {kept['pid']}) at {kept['url']}")
    return 0


# --- one edit on one server ----------------------------------------------------------------------------------------

def describe(prompt: dict, node_id, class_type: str | None = None) -> str:
    """How errors name a node: node 7 'Forgedit Sampler' (ForgeditSampler)."""
    node = prompt.get(str(node_id), {})
    return f"node {node_id} '{node.get('_meta', {}).get('title', '?')}' ({class_type or node.get('class_type', '?')})"


def rejection(prompt: dict, answer: dict) -> list[str]:
    """Readable lines for a 400 answer of POST /prompt: which node, which input, why."""
    error = answer.get("error", {})
    lines = [f"ComfyUI rejected the prompt: {error.get('message', error)}"]
    for node_id, entry in answer.get("node_errors", {}).items():
        for e in entry.get("errors", []):
            where = f", input {e['extra_info']['input_name']}" if e.get("extra_info", {}).get("input_name") else ""
            node = describe(prompt, node_id, entry.get("class_type"))
            lines.append(f"  {node}{where}: {e['message']}: {e.get('details', '')}")
    if not answer.get("node_errors") and error.get("details"):
        lines.append(f"  {error['details']}")
    return lines


def queue_prompt(server: str, prompt: dict, client_id: str) -> str:
    """POST /prompt; a rejection raises RunError with the node errors."""
    try:
        answer = post_json(server, "/prompt", {"prompt": prompt, "client_id": client_id})
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            raise RunError("\n".join(rejection(prompt, json.loads(body)))) from None
        except json.JSONDecodeError:
            text = body[:500].decode(errors="replace")
            raise RunError(f"{server} answered HTTP {e.code} to the prompt: {text}") from None
    if answer.get("node_errors"):
        raise RunError("\n".join(rejection(prompt, answer)[1:] + ["  (these outputs were skipped)"]))
    return answer["prompt_id"]


def show(message: str, prompt: dict, prompt_id: str, shown: dict, log) -> bool:
    """Print one websocket message about this prompt (node started, step n of m); True once the prompt is done."""
    parsed = json.loads(message)
    kind, data = parsed.get("type"), parsed.get("data") or {}
    if data.get("prompt_id") not in (None, prompt_id):
        return False
    if kind == "execution_cached" and data.get("nodes"):
        log(f"cached: {', '.join(prompt[n]['_meta']['title'] for n in data['nodes'] if n in prompt)}")
    elif kind == "executing" and data.get("node") is not None:
        log(describe(prompt, data["node"]))
    elif kind == "progress":
        value, total, node = data["value"], data["max"], data.get("node")
        tenth = value * 10 // max(total, 1)
        if shown.get(node) != tenth or value == total:
            shown[node] = tenth
            title = prompt.get(node, {}).get("_meta", {}).get("title", node)
            filled = 20 * value // max(total, 1)
            log(f"  {title}: step {value}/{total} [{'#' * filled}{'.' * (20 - filled)}]")
    return kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id


def finished(server: str, prompt_id: str) -> dict | None:
    """The prompt's /history entry once it is done; None while it runs or while the server is too busy to answer."""
    try:
        return get_json(server, f"/history/{prompt_id}").get(prompt_id)
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            return None
        raise
    except TimeoutError:
        return None


def cancel(server: str, prompt_id: str) -> None:
    """Take the prompt off the queue, or interrupt it if it runs (ComfyUI interrupts only that prompt)."""
    try:
        post_json(server, "/queue", {"delete": [prompt_id]})
        post_json(server, "/interrupt", {"prompt_id": prompt_id})
    except (OSError, ValueError):
        pass


def follow(server: str, ws: WebSocket, prompt: dict, prompt_id: str, log, timeout: float | None = None) -> dict:
    """Show progress until the prompt is done (asking /history whenever the websocket is quiet); its /history entry.
    After timeout seconds the prompt is cancelled and RunError raised."""
    shown, entry = {}, None
    deadline = None if timeout is None else time.monotonic() + timeout
    while entry is None:
        wait = 30 if deadline is None else min(30.0, max(0.05, deadline - time.monotonic()))
        try:
            message = ws.receive(wait)
        except TimeoutError:
            message = None
        if message is None or isinstance(message, str) and show(message, prompt, prompt_id, shown, log):
            entry = finished(server, prompt_id)
        if entry is None and deadline is not None and time.monotonic() >= deadline:
            cancel(server, prompt_id)
            raise RunError(f"timed out after {timeout:g} s (--timeout); the prompt {prompt_id} was cancelled "
                           f"on {server}")
    return entry


def failure(prompt: dict, entry: dict) -> str | None:
    """Why a finished prompt did not succeed (from its history messages), or None."""
    status = entry.get("status", {})
    if status.get("status_str") != "error":
        return None
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"{describe(prompt, data['node_id'], data.get('node_type'))} failed: "
                    f"{data.get('exception_type', '').rpartition('.')[2]}: {data.get('exception_message', '').strip()}")
        if kind == "execution_interrupted":
            return f"interrupted at {describe(prompt, data['node_id'], data.get('node_type'))}"
    return "the prompt failed (no error message in /history)"


def download(server: str, prompt: dict, entry: dict, out: Path, log) -> list[Path]:
    """Fetch every image the prompt's outputs list (GET /view) into out; print text outputs (caption, saved file)."""
    saved = []
    for node_id, output in entry.get("outputs", {}).items():
        for text in output.get("text", []):
            log(f"{prompt.get(node_id, {}).get('_meta', {}).get('title', node_id)}: {text}")
        for image in output.get("images", []):
            query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
            out.mkdir(parents=True, exist_ok=True)
            path = out / Path(image["filename"]).name
            path.write_bytes(http(server, f"/view?{query}"))
            saved.append(path)
            log(f"saved {path}")
    return saved


def check_model_files(server: str, prompt: dict, object_info: dict) -> None:
    """RunError naming every model file the prompt names that the server does not have, and the folder it belongs in."""
    missing = missing_model_files(prompt, object_info)
    if not missing:
        return
    try:
        folders = get_json(server, "/internal/folder_paths", timeout=30)
    except (OSError, ValueError):
        folders = {}
    lines = []
    for node_id, name, value, folder, options in missing:
        where = (folders.get(folder) or [f"models/{folder}"])[0]  # the first is where ComfyUI's own files go
        have = ", ".join(options[:8]) + (", ..." if len(options) > 8 else "") if options else "none"
        lines.append(f"{describe(prompt, node_id)}, input {name}: no file {value!r} in {where} on {server} "
                     f"(it has: {have}); put the file there or choose another with --set {node_id}.{name}=...")
    raise RunError("\n".join(["a model file the workflow names is missing (nothing was queued):", *lines]))


def set_images(server: str, prompt: dict, primitives: dict, job: dict) -> None:
    """Upload the photos and put them into the Load Image nodes: each --image NODE=PATH into that node (id or title),
    the plain --image (or the CSV's image) into every other Load Image node."""
    chosen = {}
    for key, path in job.get("named_images", {}).items():
        ids = [i for i in workflow_api.find_nodes(prompt, primitives, key) if prompt.get(i, {}).get("class_type") ==
               "LoadImage"]
        if not ids:
            raise RunError(f"--image {key}={path}: no Load Image node has the id or title {key!r}")
        chosen.update(dict.fromkeys(ids, path))
    if job.get("image"):
        others = [i for i, n in prompt.items() if n["class_type"] == "LoadImage" and i not in chosen]
        if not others:
            raise RunError("--image: this workflow has no LoadImage node" + (" left" if chosen else ""))
        chosen.update(dict.fromkeys(others, job["image"]))
    uploaded = {}
    for node, path in chosen.items():
        if path not in uploaded:
            uploaded[path] = upload_image(server, Path(path))
        prompt[node]["inputs"]["image"] = uploaded[path]


def run_job(server: str, object_info: dict, workflow: dict, job: dict, args, log) -> list[Path]:
    """Convert, set the inputs, check the model files, upload, queue, follow and download one edit; raises RunError
    when it fails."""
    prompt, primitives = convert(workflow, object_info)
    if job.get("target"):
        set_target(prompt, job["target"])
    if job.get("source"):
        set_source(prompt, job["source"])
    if args.checkpoint:
        set_class_input(prompt, {"CheckpointLoaderSimple": "ckpt_name"}, args.checkpoint, "--checkpoint")
    if job.get("gamma"):
        set_class_input(prompt, GAMMA_INPUTS, job["gamma"], "gamma")
    if job.get("strategy"):
        set_class_input(prompt, {"ForgeditForget": "strategy"}, job["strategy"], "strategy")
    for tau in TAUS:
        if job.get(tau):
            set_class_input(prompt, {"ForgeditP2PEdit": tau}, job[tau], tau)
    for assignment in args.set:
        set_input(prompt, primitives, object_info, assignment)
    check_model_files(server, prompt, object_info)
    set_images(server, prompt, primitives, job)
    client_id = uuid.uuid4().hex
    ws = WebSocket(server, client_id)
    try:
        prompt_id = queue_prompt(server, prompt, client_id)
        log(f"queued {prompt_id} on {server}")
        entry = follow(server, ws, prompt, prompt_id, log, args.timeout)
    finally:
        ws.close()
    saved = download(server, prompt, entry, job["out"], log)
    problem = failure(prompt, entry)
    if problem:
        raise RunError(problem)
    return saved


# --- command line --------------------------------------------------------------------------------------------------

BATCH_COLUMNS = ("source", "gamma", "strategy", *TAUS)  # optional; an empty cell keeps the workflow's value


def read_batch(path: Path, out: Path) -> list[dict]:
    """Jobs from a CSV with columns image,target (or target_prompt) and optional source, gamma, strategy and the τ
    columns (image paths relative to the CSV; an empty image cell for a workflow without Load Image)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    target = next((c for c in ("target", "target_prompt") if rows and c in rows[0]), None)
    if not rows or "image" not in rows[0] or target is None:
        raise RunError(f"{path}: needs a header row with the columns image,target (and optionally "
                       f"{','.join(BATCH_COLUMNS)})")
    jobs = []
    for n, row in enumerate(rows, 1):
        slug = re.sub(r"[^A-Za-z0-9]+", "-", row[target]).strip("-")[:40]
        image = (row["image"] or "").strip()
        jobs.append({"label": f"{n}/{len(rows)}", "image": path.parent / image if image else None,
                     "target": row[target], **{c: (row.get(c) or "").strip() for c in BATCH_COLUMNS},
                     "out": out / f"{n:03d}-{slug}"})
    return jobs


def worker(server: str, jobs: queue.Queue, workflow: dict, args, failures: list, done: list) -> None:
    """Take jobs until none are left (one thread per server). Every job taken ends in done or in failures, whatever
    goes wrong, a bug in run.py included."""
    try:
        object_info = get_json(server, "/object_info")
    except Exception as e:  # noqa: BLE001  an unreachable server, or a broken answer
        failures.append(f"{server}: cannot reach the server ({type(e).__name__}: {e})")
        say(f"error: cannot reach {server} ({e})", file=sys.stderr)
        return
    while True:
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            return
        prefix = f"[{job['label']} {server}] " if job.get("label") else ""
        log = lambda line: say(prefix + line)  # noqa: E731
        try:
            run_job(server, object_info, workflow, job, args, log)
            done.append(job)
        except (RunError, OSError) as e:
            text = str(e) if isinstance(e, RunError) else f"{server}: {type(e).__name__}: {e}"
            failures.append(prefix + text)
            say(*(prefix + line for line in text.splitlines()), file=sys.stderr)
        except Exception as e:  # noqa: BLE001  a bug: report it with its traceback, go on with the next job
            text = f"{server}: run.py crashed: {type(e).__name__}: {e}"
            failures.append(prefix + text)
            say(*(prefix + line for line in traceback.format_exc().splitlines()), prefix + text, file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path, nargs="?",
                        help="a UI-format workflow, e.g. workflows/forgedit_vanilla.json")
    parser.add_argument("--image", action="append", default=[], metavar="[NODE=]PATH",
                        help="the photo to edit; goes to every Load Image node. NODE=PATH (repeatable) puts an image "
                             "into one Load Image node, by id or title, e.g. 'Edited image=edit.png'")
    parser.add_argument("--target", help="the target prompt, e.g. 'a sitting dog'")
    parser.add_argument("--source", help="the source prompt (what the photo shows) where the workflow types one, "
                                         "e.g. the inversion's")
    parser.add_argument("--checkpoint", help="checkpoint file name for Load Checkpoint (as in models/checkpoints)")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="set any value; NODE is a node id, title or class type (repeatable)")
    parser.add_argument("--server", action="append",
                        help="ComfyUI URL (repeatable); without it run.py uses or starts a local ComfyUI")
    parser.add_argument("--out", type=Path, default=Path("forgedit_out"),
                        help="where the images go (default ./forgedit_out)")
    parser.add_argument("--batch", type=Path,
                        help="CSV of edits: image,target[,source][,gamma][,strategy][,tau_v,tau_c,tau_s,tau_u]; "
                             "spread over the servers")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="cancel an edit that is not done this many seconds after it was queued")
    local = parser.add_argument_group("a local ComfyUI (without --server)")
    local.add_argument("--comfyui", type=Path, metavar="PATH",
                       help="the ComfyUI to start (default $COMFYUI_PATH, else the one holding this pack)")
    local.add_argument("--comfyui-args", metavar="ARGS", default="",
                       help="more arguments for its main.py, one string, e.g. '--lowvram' or '--cpu'")
    local.add_argument("--keep-server", action="store_true",
                       help="leave the started ComfyUI running; later calls reuse it (its cache keeps the fine-tune)")
    local.add_argument("--stop-server", action="store_true", help="stop the ComfyUI --keep-server left running")
    local.add_argument("--start-timeout", type=float, default=300, metavar="SECONDS",
                       help="how long to wait for it to start (default 300)")
    args = parser.parse_args(argv)
    args.named_images, plain = {}, []
    for value in args.image:
        key, sep, path = value.partition("=")
        if sep and key and path and not Path(value).is_file():
            args.named_images[key] = Path(path)
        else:
            plain.append(Path(value))
    if len(plain) > 1:
        parser.error("--image PATH goes to every Load Image node: give it once, the other images as NODE=PATH")
    args.image = plain[0] if plain else None
    if args.workflow is None and not args.stop_server:
        parser.error("the workflow file is required")
    return args


def run_jobs(servers: list[str], workflow: dict, jobs: list[dict], args) -> int:
    """Every job over the servers (one worker thread each); 0 when each one succeeded."""
    todo, failures, done = queue.Queue(), [], []
    for job in jobs:
        todo.put(job)
    threads = [threading.Thread(target=worker, args=(s, todo, workflow, args, failures, done), daemon=True)
               for s in servers]  # daemons: Ctrl-C ends run.py (and stops the ComfyUI it started) at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not todo.empty():
        failures.append(f"{todo.qsize()} edits were not run: no server could be reached")
    if len(done) != len(jobs) and not failures:
        failures.append(f"{len(jobs) - len(done)} edits did not finish")
    if failures and len(jobs) > 1:
        say(f"{len(jobs) - len(done)} of {len(jobs)} edits failed:", *failures, file=sys.stderr)
    return 0 if len(done) == len(jobs) and not failures else 1


def main(argv=None) -> int:
    """Run one edit, or every row of --batch spread over the servers; 0 when everything succeeded."""
    args = parse_args(argv)
    try:
        if args.stop_server:
            return stop_kept_server(args)
        workflow = json.loads(args.workflow.read_text(encoding="utf-8"))
        jobs = read_batch(args.batch, args.out) if args.batch else [
            {"image": args.image, "target": args.target, "source": args.source, "out": args.out}]
        for job in jobs:
            job["named_images"] = args.named_images
    except (OSError, ValueError, RunError) as e:
        say(f"error: {e}", file=sys.stderr)
        return 1
    images = {j["image"] for j in jobs if j.get("image")} | set(args.named_images.values())
    missing = sorted(str(i) for i in images if not Path(i).is_file())
    if missing:
        say(f"error: no such image: {', '.join(missing)}", file=sys.stderr)
        return 1
    local = None
    try:
        if not args.server:
            local = LocalServer(args)
        return run_jobs(args.server or [local.url], workflow, jobs, args)
    except RunError as e:
        say(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if local is not None:
            local.close()


if __name__ == "__main__":
    sys.exit(main())
