#!/usr/bin/env python3
"""Run a shipped Forgedit workflow (UI format, as ComfyUI saves it) on one or more running ComfyUI servers.

    python run.py workflows/forgedit_vanilla.json --image dog.png --target "a sitting dog"
    python run.py workflows/forgedit_vanilla.json --batch edits.csv --server http://gpu1:8188 --server http://gpu2:8188

The workflow is converted to an API prompt with the server's /object_info, the image is uploaded, the prompt queued,
progress is shown from the websocket and the images end up in --out. Standard library only.
"""
import argparse
import base64
import csv
import json
import mimetypes
import os
import queue
import re
import socket
import ssl
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED, BYPASSED = 2, 4
GAMMA_INPUTS = {"ForgeditInterpolate": "gammas", "ForgeditSampler": "gammas"}
PRINT_LOCK = threading.Lock()


class RunError(Exception):
    """A problem with the workflow, the command line or the server's answer; the message says what to fix."""


def say(*lines: str, file=None) -> None:
    """Print whole lines at once (several worker threads share stdout)."""
    with PRINT_LOCK:
        print("\n".join(lines), file=file or sys.stdout, flush=True)


# --- HTTP ---------------------------------------------------------------------------------------------------------

def http(server: str, path: str, data: bytes | None = None, headers: dict | None = None) -> bytes:
    """GET (or POST when data is given) server+path and return the body; HTTP errors raise urllib's HTTPError."""
    request = urllib.request.Request(server.rstrip("/") + path, data, headers or {})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read()


def get_json(server: str, path: str):
    """GET a JSON document."""
    return json.loads(http(server, path))


def post_json(server: str, path: str, body: dict):
    """POST a JSON document and decode the JSON answer."""
    return json.loads(http(server, path, json.dumps(body).encode(), {"Content-Type": "application/json"}) or b"null")


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


# --- websocket (RFC 6455 client, just what ComfyUI's /ws needs) ----------------------------------------------------

class WebSocket:
    """Receives ComfyUI's status messages; sends nothing but pongs and the closing frame."""

    def __init__(self, server: str, client_id: str, timeout: float = 30):
        url = urllib.parse.urlsplit(server)
        secure = url.scheme == "https"
        self.sock = socket.create_connection((url.hostname, url.port or (443 if secure else 80)), timeout)
        if secure:
            self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=url.hostname)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {url.path.rstrip('/')}/ws?clientId={client_id} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buffer, self.parts, self.kind = b"", [], 1
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise RunError(f"{server} refused the websocket: {head.splitlines()[0].decode(errors='replace')}")

    def _recv(self) -> bytes:
        """Whatever the socket has (socket.timeout after the timeout); a closed connection raises."""
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the websocket")
        return chunk

    def _frame(self) -> tuple[int, bytes] | None:
        """Take one whole frame (first byte, unmasked payload) off the buffer, or None if it is not all there yet."""
        b = self.buffer
        if len(b) < 2:
            return None
        n, at = b[1] & 0x7F, 2
        if n > 125:
            at += 2 if n == 126 else 8
            if len(b) < at:
                return None
            n = int.from_bytes(b[2:at], "big")
        mask = b[at:at + 4] if b[1] & 0x80 else None
        at += 4 if mask is not None else 0
        if len(b) < at + n:
            return None
        payload, self.buffer = b[at:at + n], b[at + n:]
        if mask is not None:
            payload = bytes(x ^ mask[i % 4] for i, x in enumerate(payload))
        return b[0], payload

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        """One masked frame (clients must mask); payloads here are at most 125 bytes."""
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def receive(self) -> str | bytes:
        """The next whole message: text as str, binary (previews) as bytes. socket.timeout when nothing came in time."""
        while True:
            frame = self._frame()
            if frame is None:
                self.buffer += self._recv()  # a timeout here keeps what was read for the next call
                continue
            head, payload = frame
            opcode = head & 0x0F
            if opcode == 8:
                raise ConnectionError("the server closed the websocket")
            if opcode == 9:
                self._send(0xA, payload[:125])
            elif opcode != 0xA:
                self.kind = self.kind if opcode == 0 else opcode
                self.parts.append(payload)
                if head & 0x80:
                    message, self.parts = b"".join(self.parts), []
                    return message.decode() if self.kind == 1 else message

    def close(self) -> None:
        """Say goodbye and close the socket."""
        try:
            self._send(8)
        except OSError:
            pass
        self.sock.close()


# --- UI workflow -> API prompt -------------------------------------------------------------------------------------

def widget_inputs(info: dict) -> list[tuple[str, int]]:
    """(name, frontend-only values after it) of each widget input, in the order the frontend stores widgets_values."""
    widgets = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            kind, options = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput"):
                # The frontend adds a control_after_generate widget where asked (and, by legacy convention, to INTs
                # named seed/noise_seed that do not say), and an upload button value after upload combos.
                control = options.get("control_after_generate", kind == "INT" and name in ("seed", "noise_seed"))
                upload = any(v is True for k, v in options.items() if k.endswith("_upload"))
                widgets.append((name, int(bool(control)) + int(upload)))
    return widgets


def input_spec(info: dict, name: str):
    """The (type, options) of an input, or None."""
    for section in ("required", "optional"):
        if name in info["input"].get(section, {}):
            spec = info["input"][section][name]
            return spec[0], (spec[1] if len(spec) > 1 else {})
    return None


def node_title(node: dict, info: dict | None) -> str:
    """The title the canvas shows: the node's own, else the class's display name."""
    return node.get("title") or (info or {}).get("display_name") or node["type"]


def convert(workflow: dict, object_info: dict) -> tuple[dict, dict]:
    """The API prompt of a UI workflow, and the PrimitiveNodes it inlined ({id: {title, targets: [(node, input)]}})."""
    if "nodes" not in workflow or "links" not in workflow:
        raise RunError("this is not a UI-format workflow (no nodes/links): save it from ComfyUI with Workflow > Save")
    if workflow.get("definitions", {}).get("subgraphs"):
        raise RunError("workflows with subgraphs are not supported: unpack the subgraphs in ComfyUI and save again")
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    links = {}
    for link in filter(None, workflow["links"]):
        if isinstance(link, dict):
            link = [link[k] for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")]
        links[link[0]] = link
    prompt, primitives = {}, {}

    def source(link_id, target, name):
        """What a link delivers: [node id, output slot], an inlined primitive value, or None (muted source)."""
        _, origin, slot, *_, kind = links[link_id]
        node = nodes[str(origin)]
        if node.get("mode", 0) == MUTED:
            return None
        if node["type"] == "Reroute":
            upstream = node["inputs"][0].get("link")
            return None if upstream is None else source(upstream, target, name)
        if node["type"] == "PrimitiveNode":
            entry = primitives.setdefault(str(origin), {"title": node.get("title") or "Primitive", "targets": []})
            entry["targets"].append((target, name))
            return node["widgets_values"][0]
        if node.get("mode", 0) == BYPASSED:
            inputs = node.get("inputs", [])
            same = [i for i in ([inputs[slot]] if slot < len(inputs) else []) + inputs if i.get("type") == kind]
            if not same:
                raise RunError(f"node {origin} '{node_title(node, object_info.get(node['type']))}' ({node['type']}) is "
                               f"bypassed but has no {kind} input to pass on to its output {slot}: enable or remove it")
            return source(same[0]["link"], target, name) if same[0].get("link") is not None else None
        return [str(origin), slot]

    for nid, node in nodes.items():
        if node.get("mode", 0) in (MUTED, BYPASSED) or node["type"] in FRONTEND_ONLY:
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise RunError(f"node {nid} '{node.get('title', node['type'])}' is a {node['type']}, which this server "
                           "does not have: install the custom node pack that provides it (or update ComfyUI)")
        values = node.get("widgets_values") or []
        inputs = {}
        if isinstance(values, dict):
            inputs = {name: values[name] for name, _ in widget_inputs(info) if name in values}
        else:
            position = 0
            for name, extras in widget_inputs(info):
                if position < len(values):
                    inputs[name] = values[position]
                position += 1 + extras
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                value = source(slot["link"], nid, slot["name"])
                if value is None:
                    inputs.pop(slot["name"], None)
                else:
                    inputs[slot["name"]] = value
        prompt[nid] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node_title(node, info)}}
    return prompt, primitives


# --- setting inputs ------------------------------------------------------------------------------------------------

def typed(value: str, spec, what: str):
    """A command-line string as the type the input declares."""
    kind = spec[0] if spec else "STRING"
    try:
        if kind == "INT":
            return int(value)
        if kind == "FLOAT":
            return float(value)
    except ValueError:
        raise RunError(f"{what} takes a number, not {value!r}") from None
    if kind == "BOOLEAN":
        if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise RunError(f"{what} takes true or false, not {value!r}")
        return value.lower() in ("true", "1", "yes", "on")
    return value


def find_nodes(prompt: dict, primitives: dict, key: str) -> list[str]:
    """Ids of the nodes (or inlined PrimitiveNodes) whose id is key; else whose title is; else whose class type is."""
    table = {**{i: (n["_meta"]["title"], n["class_type"]) for i, n in prompt.items()},
             **{i: (p["title"], "PrimitiveNode") for i, p in primitives.items()}}
    for field in (lambda i: i, lambda i: table[i][0], lambda i: table[i][1]):
        found = [i for i in table if field(i) == key]
        if found:
            return found
    return []


def set_input(prompt: dict, primitives: dict, object_info: dict, assignment: str) -> None:
    """Apply one --set NODE.INPUT=VALUE (NODE: node id, title or class type; for a PrimitiveNode INPUT is 'value')."""
    target, sep, value = assignment.partition("=")
    key, dot, name = target.rpartition(".")
    if not (sep and dot and key and name):
        raise RunError(f"--set {assignment!r}: write NODE.INPUT=VALUE, e.g. ForgeditSampler.steps=30 or 7.seed=3")
    ids = find_nodes(prompt, primitives, key)
    if not ids:
        raise RunError(f"--set {assignment!r}: no node has the id, title or class type {key!r}")
    for i in ids:
        if i in primitives:
            fields = {field for _, field in primitives[i]["targets"]}
            if name != "value" and name not in fields:
                raise RunError(f"--set {assignment!r}: {key!r} is a primitive; set it with {key}.value=...")
            for node, field in primitives[i]["targets"]:
                info = object_info[prompt[node]["class_type"]]
                prompt[node]["inputs"][field] = typed(value, input_spec(info, field), f"primitive {key!r}")
            continue
        info = object_info[prompt[i]["class_type"]]
        spec = input_spec(info, name)
        widgets = [w for w, _ in widget_inputs(info)]
        if spec is None or name not in widgets:
            raise RunError(f"--set {assignment!r}: node {i} ({prompt[i]['class_type']}) has no value input {name!r}; "
                           f"it has {', '.join(widgets) or 'none'}")
        prompt[i]["inputs"][name] = typed(value, spec, f"{prompt[i]['class_type']}.{name}")


def set_target(prompt: dict, text: str) -> None:
    """Put the target prompt into every CLIP Text Encode that feeds a `target` input of a Forgedit node, and into every
    Forgedit `target_prompt` widget (Caption's 'A photo of' rule, Imagic's initial embedding)."""
    found = 0
    for node in prompt.values():
        link = node["inputs"].get("target")
        if node["class_type"].startswith("Forgedit") and isinstance(link, list):
            encoder = prompt[link[0]]
            if encoder["class_type"] != "CLIPTextEncode" or isinstance(encoder["inputs"].get("text"), list):
                raise RunError(f"--target: node {link[0]} ({encoder['class_type']}) feeds the target but is not a CLIP "
                               "Text Encode with its own text; set the text with --set instead")
            encoder["inputs"]["text"] = text
            found += 1
        if node["class_type"].startswith("Forgedit") and isinstance(node["inputs"].get("target_prompt"), str):
            node["inputs"]["target_prompt"] = text
    if not found:
        raise RunError("--target: no CLIP Text Encode feeds the target input of a Forgedit node in this workflow")


def set_class_input(prompt: dict, classes: dict, value, option: str) -> None:
    """Set {class type: input} on every node of those classes; an error if the workflow has none."""
    nodes = [n for n in prompt.values() if n["class_type"] in classes]
    if not nodes:
        raise RunError(f"{option}: this workflow has no {' or '.join(classes)} node")
    for node in nodes:
        node["inputs"][classes[node["class_type"]]] = value


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
            log(f"  {prompt.get(node, {}).get('_meta', {}).get('title', node)}: step {value}/{total}")
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


def follow(server: str, ws: WebSocket, prompt: dict, prompt_id: str, log) -> dict:
    """Show progress until the prompt is done (asking /history whenever the websocket is quiet); its /history entry."""
    shown, entry = {}, None
    while entry is None:
        try:
            message = ws.receive()
        except TimeoutError:
            message = None
        if message is None or isinstance(message, str) and show(message, prompt, prompt_id, shown, log):
            entry = finished(server, prompt_id)
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


def run_job(server: str, object_info: dict, workflow: dict, job: dict, args, log) -> list[Path]:
    """Convert, set the inputs, upload, queue, follow and download one edit; raises RunError when it fails."""
    prompt, primitives = convert(workflow, object_info)
    if job.get("image"):
        set_class_input(prompt, {"LoadImage": "image"}, upload_image(server, Path(job["image"])), "--image")
    if job.get("target"):
        set_target(prompt, job["target"])
    if args.checkpoint:
        set_class_input(prompt, {"CheckpointLoaderSimple": "ckpt_name"}, args.checkpoint, "--checkpoint")
    if job.get("gamma"):
        set_class_input(prompt, GAMMA_INPUTS, job["gamma"], "gamma")
    if job.get("strategy"):
        set_class_input(prompt, {"ForgeditForget": "strategy"}, job["strategy"], "strategy")
    for assignment in args.set:
        set_input(prompt, primitives, object_info, assignment)
    client_id = uuid.uuid4().hex
    ws = WebSocket(server, client_id)
    try:
        prompt_id = queue_prompt(server, prompt, client_id)
        log(f"queued {prompt_id} on {server}")
        entry = follow(server, ws, prompt, prompt_id, log)
    finally:
        ws.close()
    saved = download(server, prompt, entry, job["out"], log)
    problem = failure(prompt, entry)
    if problem:
        raise RunError(problem)
    return saved


# --- command line --------------------------------------------------------------------------------------------------

def read_batch(path: Path, out: Path) -> list[dict]:
    """Jobs from a CSV with columns image,target and optional gamma,strategy (image paths relative to the CSV)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"image", "target"} <= set(rows[0]):
        raise RunError(f"{path}: needs a header row with the columns image,target (and optionally gamma,strategy)")
    jobs = []
    for n, row in enumerate(rows, 1):
        slug = re.sub(r"[^A-Za-z0-9]+", "-", row["target"]).strip("-")[:40]
        jobs.append({"label": f"{n}/{len(rows)}", "image": path.parent / row["image"], "target": row["target"],
                     "gamma": (row.get("gamma") or "").strip(), "strategy": (row.get("strategy") or "").strip(),
                     "out": out / f"{n:03d}-{slug}"})
    return jobs


def worker(server: str, jobs: queue.Queue, workflow: dict, args, failures: list) -> None:
    """Take jobs until none are left (one thread per server)."""
    try:
        object_info = get_json(server, "/object_info")
    except (OSError, ValueError) as e:
        failures.append(f"{server}: cannot reach the server ({e})")
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
        except (RunError, OSError) as e:
            text = str(e) if isinstance(e, RunError) else f"{server}: {type(e).__name__}: {e}"
            failures.append(prefix + text)
            say(*(prefix + line for line in text.splitlines()), file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path, help="a UI-format workflow, e.g. workflows/forgedit_vanilla.json")
    parser.add_argument("--image", type=Path, help="the photo to edit; goes to every Load Image node")
    parser.add_argument("--target", help="the target prompt, e.g. 'a sitting dog'")
    parser.add_argument("--checkpoint", help="checkpoint file name for Load Checkpoint (as in models/checkpoints)")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="set any value; NODE is a node id, title or class type (repeatable)")
    parser.add_argument("--server", action="append", help="ComfyUI URL (repeatable; default http://127.0.0.1:8188)")
    parser.add_argument("--out", type=Path, default=Path("forgedit_out"),
                        help="where the images go (default ./forgedit_out)")
    parser.add_argument("--batch", type=Path,
                        help="CSV of edits: image,target[,gamma][,strategy]; spread over the servers")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run one edit, or every row of --batch spread over the servers; 0 when everything succeeded."""
    args = parse_args(argv)
    servers = args.server or ["http://127.0.0.1:8188"]
    try:
        workflow = json.loads(args.workflow.read_text(encoding="utf-8"))
        jobs = read_batch(args.batch, args.out) if args.batch else [
            {"image": args.image, "target": args.target, "out": args.out}]
    except (OSError, ValueError, RunError) as e:
        say(f"error: {e}", file=sys.stderr)
        return 1
    missing = [str(j["image"]) for j in jobs if j.get("image") and not Path(j["image"]).is_file()]
    if missing:
        say(f"error: no such image: {', '.join(missing)}", file=sys.stderr)
        return 1
    todo, failures = queue.Queue(), []
    for job in jobs:
        todo.put(job)
    threads = [threading.Thread(target=worker, args=(s, todo, workflow, args, failures)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not todo.empty():
        failures.append(f"{todo.qsize()} edits were not run: no server could be reached")
    if failures and len(jobs) > 1:
        say(f"{len(failures)} of {len(jobs)} edits failed:", *failures, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
