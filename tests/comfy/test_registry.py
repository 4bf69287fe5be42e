"""What the Comfy Registry and ComfyUI's node help read from the pack: a help page per registered node that names every
input, served from WEB_DIRECTORY where the frontend looks for it; LICENSE, .comfyignore, the icon and [tool.comfy]."""
import asyncio
import fnmatch
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from find_comfyui import PACK, comfyui_path
from servers import run

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

WEB = PACK / "web"
DOCS = WEB / "docs"
PYPROJECT = tomllib.loads((PACK / "pyproject.toml").read_text())


def registered_ids(comfy) -> list[str]:
    """The node ids the pack's comfy_entrypoint registers, as ComfyUI's loader asks for them."""
    extension = asyncio.run(comfy.pack.comfy_entrypoint())
    return [cls.GET_SCHEMA().node_id for cls in asyncio.run(extension.get_node_list())]


NODE_IDS = ["ForgeditCaption", "ForgeditFinetune", "ForgeditImagic", "ForgeditDreamBooth", "ForgeditTextEncoder",
            "ForgeditInterpolate", "ForgeditForget", "ForgeditSampler", "ForgeditSave", "ForgeditLoad", "ForgeditExportLora",
            "ForgeditImageEncoderLoader", "ForgeditDDIMInversion", "ForgeditNullTextInversion",
            "ForgeditStyleDiffusionTrain", "ForgeditInversionSave", "ForgeditInversionLoad", "ForgeditStyleDiffusionImport",
            "ForgeditP2PEdit", "ForgeditWordMask", "ForgeditNSLPIPS", "ForgeditScore"]


def test_the_pack_registers_the_nodes_the_docs_cover(comfy):
    ids = registered_ids(comfy)
    assert ids == NODE_IDS
    assert all(i in comfy.nodes.NODE_CLASS_MAPPINGS for i in ids)
    assert sorted(p.stem for p in DOCS.glob("*.md")) == sorted(ids), "a help page per registered node, and no other"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_each_help_page_names_every_input_and_output(comfy, node_id):
    schema = comfy.nodes.NODE_CLASS_MAPPINGS[node_id].define_schema()
    page = (DOCS / f"{node_id}.md").read_text(encoding="utf-8")
    assert page.startswith(f"# {schema.display_name}\n"), "the page is titled with the node's display name"
    for section in ("## Inputs", "## Outputs", "## Typical use", "## Common errors"):
        assert section in page, f"{node_id}.md has no '{section}' section"
    missing = [i.id for i in schema.inputs if f"`{i.id}`" not in page]
    assert not missing, f"{node_id}.md does not name the inputs {missing}"
    missing = [o.display_name for o in schema.outputs if f"`{o.display_name}`" not in page]
    assert not missing, f"{node_id}.md does not name the outputs {missing}"


def test_comfyui_serves_the_web_directory(comfy):
    """0.3.64's loader reads WEB_DIRECTORY of a V3 pack too, under the pack folder's name, which is where the frontend
    looks: /extensions/<folder>/docs/<node id>.md (python_module custom_nodes.<folder>)."""
    assert comfy.pack.WEB_DIRECTORY == "./web"
    assert Path(comfy.nodes.EXTENSION_WEB_DIRS[PACK.name]) == WEB


def test_license_matches_pyproject():
    assert PYPROJECT["project"]["license"] == {"text": "MIT"}
    text = (PACK / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 Forgedit for ComfyUI contributors" in text
    assert "Permission is hereby granted, free of charge" in text and 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def ignored(path: str, patterns: list[str]) -> bool:
    """gitignore matching for the forms .comfyignore uses (`name`, `/anchored`, `dir/`, globs, `!`): last match wins."""
    parts = path.split("/")
    result = False
    for raw in patterns:
        negate, pattern = raw.startswith("!"), raw.removeprefix("!")
        directory, pattern = pattern.endswith("/"), pattern.rstrip("/")
        anchored, pattern = "/" in pattern, pattern.lstrip("/")
        n = pattern.count("/") + 1
        for s in [0] if anchored else range(len(parts)):
            fits = s + n < len(parts) if directory else s + n <= len(parts)  # a directory has more path below it
            if fits and fnmatch.fnmatchcase("/".join(parts[s:s + n]), pattern):
                result = not negate
                break
    return result


def test_comfyignore_keeps_development_files_out_of_the_archive():
    patterns = [line.strip() for line in (PACK / ".comfyignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in ("tests/comfy/test_registry.py", "tests/pytest.ini", "benchmarks/finetune.py", ".ci/run", "out/x.png",
                 "requirements-dev.txt", "nodes/__pycache__/edit.cpython-311.pyc"):
        assert ignored(path, patterns), f"{path} would be published"
    for path in ("__init__.py", "nodes/edit.py", "forgedit_ops/interpolation.py", "web/docs/ForgeditFinetune.md",
                 "web/icon.svg", "workflows/imagic.json", "LICENSE", "pyproject.toml", "README.md", "requirements.txt",
                 "run.py"):
        assert not ignored(path, patterns), f"{path} would be left out of the archive"


def test_icon_is_a_square_svg_in_the_repository_that_pyproject_points_at():
    """The registry wants a URL: the raw file of this repository's default branch."""
    icon, repository = PYPROJECT["tool"]["comfy"]["Icon"], PYPROJECT["project"]["urls"]["Repository"]
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+)", repository).group(1)
    match = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(owner_repo)}/main/(.+)", icon)
    assert match, f"Icon {icon!r} is not a raw URL of {repository}"
    svg = (PACK / match.group(1)).read_text()
    size = re.search(r'<svg[^>]*\bwidth="(\d+)"[^>]*\bheight="(\d+)"[^>]*viewBox="0 0 (\d+) (\d+)"', svg)
    assert size and len(set(size.groups())) == 1 and int(size.group(1)) <= 400, "square, at most 400 px"


def test_comfyuis_parser_reads_the_registry_fields(comfy):
    """ComfyUI's own pyproject parser (comfy_config, as the loader calls it) sees what the registry will."""
    from comfy_config import config_parser
    import comfyui_version

    config = config_parser.extract_node_configuration(str(PACK))
    assert config.project.name == "forgedit" and config.project.license.text == "MIT"
    assert config.tool_comfy.icon == PYPROJECT["tool"]["comfy"]["Icon"]
    floor = re.fullmatch(r">=(\d+)\.(\d+)\.(\d+)", config.project.supported_comfyui_version)
    assert floor, "requires-comfyui is an operator plus X.Y.Z"
    running = tuple(int(x) for x in comfyui_version.__version__.split(".")[:3])
    assert floor.groups() == ("0", "3", "64"), "the floor is the release the tests target (0.3.64, a125cd84)"
    assert running >= tuple(map(int, floor.groups())), "the tests run on a ComfyUI the pack claims to support"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_a_real_server_serves_the_help_pages_where_the_frontend_fetches_them(tmp_path):
    """`main.py --cpu` with this pack as custom_nodes/forgedit (as `git clone … forgedit` installs it): /object_info
    says python_module custom_nodes.forgedit, from which the frontend's node help (NodeHelpService) fetches
    /extensions/forgedit/docs/<node id>/<locale>.md, then /extensions/forgedit/docs/<node id>.md."""
    (tmp_path / "custom_nodes").mkdir()
    (tmp_path / "custom_nodes" / "forgedit").symlink_to(PACK, target_is_directory=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes",
             "--base-directory", str(tmp_path), "--database-url", "sqlite:///:memory:"],
            cwd=comfyui_path(), stdout=log, stderr=subprocess.STDOUT)
        try:
            end, info = time.monotonic() + 120, None
            while info is None:
                assert process.poll() is None and time.monotonic() < end, (tmp_path / "server.log").read_text()[-3000:]
                try:
                    info = json.loads(get(f"{url}/object_info/ForgeditFinetune"))["ForgeditFinetune"]
                except (OSError, KeyError, ValueError):
                    time.sleep(0.5)
            assert info["python_module"] == "custom_nodes.forgedit"
            for page in sorted(DOCS.glob("*.md")):
                assert get(f"{url}/extensions/forgedit/docs/{page.name}") == page.read_bytes()
            with pytest.raises(urllib.error.HTTPError):  # no per-locale pages: the frontend falls back to <id>.md
                get(f"{url}/extensions/forgedit/docs/ForgeditFinetune/en.md")
            assert get(f"{url}/extensions/forgedit/icon.svg") == (WEB / "icon.svg").read_bytes()
        finally:
            run.stop_process(process.pid, process)
