"""UI workflow (as ComfyUI's frontend saves it) -> API prompt (what POST /prompt takes), and the edits run.py makes to
the prompt (--set, --target, --source, one input on every node of a class). Standard library only and no ComfyUI
import: it needs just a server's /object_info (or a saved copy of it), so it is tested offline in tests/ops."""

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED, BYPASSED = 2, 4


class RunError(Exception):
    """A problem with the workflow, the command line or the server's answer; the message says what to fix."""


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


EDIT_PROMPTS = {"ForgeditP2PEdit"}  # nodes whose target_prompt widget is the edit itself


def set_target(prompt: dict, text: str) -> None:
    """Put the target prompt into every CLIP Text Encode that feeds a `target` input of a Forgedit node, and into every
    Forgedit `target_prompt` widget (the P2P editor's target; Caption's 'A photo of' rule, Imagic's initial
    embedding)."""
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
            found += node["class_type"] in EDIT_PROMPTS
    if not found:
        raise RunError("--target: no CLIP Text Encode feeds the target input of a Forgedit node in this workflow, and "
                       "no Forgedit P2P / P2Plus Edit has a typed target_prompt")


SOURCE_PROMPTS = {"ForgeditWordMask": "prompt"}  # Forgedit nodes whose source prompt input has another name


def set_source(prompt: dict, text: str) -> None:
    """Put the source prompt (what the photo shows) into every typed `source_prompt` of a Forgedit node (the fine-tunes,
    Imagic, the inversions) and Word Mask's `prompt`. One that comes from Forgedit Caption is left alone."""
    found = [(n, SOURCE_PROMPTS.get(n["class_type"], "source_prompt")) for n in prompt.values()
             if n["class_type"].startswith("Forgedit")]
    found = [(n, name) for n, name in found if isinstance(n["inputs"].get(name), str)]
    if not found:
        raise RunError("--source: no Forgedit node in this workflow has a typed source_prompt (it comes from Forgedit "
                       "Caption, or is part of the saved result or inversion)")
    for node, name in found:
        node["inputs"][name] = text


def set_class_input(prompt: dict, classes: dict, value, option: str) -> None:
    """Set {class type: input} on every node of those classes; an error if the workflow has none."""
    nodes = [n for n in prompt.values() if n["class_type"] in classes]
    if not nodes:
        raise RunError(f"{option}: this workflow has no {' or '.join(classes)} node")
    for node in nodes:
        node["inputs"][classes[node["class_type"]]] = value


# --- model files the prompt names ----------------------------------------------------------------------------------

MODEL_INPUTS = {  # input name -> models/ folder, for the loaders of the core nodes
    "ckpt_name": "checkpoints", "vae_name": "vae", "lora_name": "loras", "unet_name": "diffusion_models",
    "clip_name": "text_encoders", "clip_name1": "text_encoders", "clip_name2": "text_encoders",
    "control_net_name": "controlnet", "style_model_name": "style_models", "upscale_model_name": "upscale_models",
}
PACK_MODEL_INPUTS = {("ForgeditLoad", "file"): "forgedit", ("ForgeditCaption", "blip_model"): "blip",
                     ("ForgeditImageEncoderLoader", "clip_name"): "clip_vision", ("CLIPVisionLoader", "clip_name"):
                     "clip_vision", ("ForgeditInversionLoad", "file"): "stylediffusion",
                     ("ForgeditStyleDiffusionImport", "pth_file"): "stylediffusion",
                     ("ForgeditScore", "clip_name"): "clip_vision"}


def combo_options(spec) -> list | None:
    """The choices of a combo input spec (legacy list form or V3 COMBO with options), else None."""
    if not spec:
        return None
    kind, options = spec
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return list(options.get("options", []))
    return None


def missing_model_files(prompt: dict, object_info: dict) -> list[tuple[str, str, str, str, list]]:
    """(node id, input, file, models folder, the files the server has) for every model file the prompt names that is not
    among the server's choices for that input: a checkpoint, a LoRA, a Forgedit Save file, a BLIP folder, the
    StyleDiffusion image encoder, a saved inversion..."""
    missing = []
    for node_id, node in prompt.items():
        info = object_info.get(node["class_type"])
        if info is None:
            continue
        for name, value in node["inputs"].items():
            folder = PACK_MODEL_INPUTS.get((node["class_type"], name)) or MODEL_INPUTS.get(name)
            options = combo_options(input_spec(info, name)) if folder else None
            if options is not None and isinstance(value, str) and value not in options:
                missing.append((node_id, name, value, folder, options))
    return missing
