"""Forgedit NS-LPIPS and Forgedit Word Mask (design §5.2, §8.1): our LPIPS against the lpips package with its random
weights copied over (nothing downloaded), the shipped linear layers are the package's, the node on weight files in a
temporary models/lpips, refusals naming the missing file, and the word mask of a DDIM inversion on the tiny scene."""
import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_node
from forgedit_ops.lpips import GRAY, lpips, ns_lpips
from PIL import Image
from safetensors.torch import load_file, save_file
from test_inversions import INVERT, scene  # noqa: F401  (scene: a fixture)
from test_registry import DOCS
from test_storage import run_output_node

TRUNK_FILE = "alexnet-owt-7be5be79.pth"


@pytest.fixture(scope="module")
def metrics(comfy):
    return importlib.import_module(comfy.pack.nodes.__name__ + ".metrics")


@pytest.fixture
def registered_nodes(metrics, monkeypatch):
    """The two nodes known to ComfyUI for one test (whether or not the pack registers them)."""
    import nodes

    for cls in (metrics.ForgeditNSLPIPS, metrics.ForgeditWordMask):
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, cls.GET_SCHEMA().node_id, cls)


@pytest.fixture(scope="module")
def package():
    """lpips.LPIPS with a random trunk and random lins (pnet_rand, not pretrained); lins made positive, as trained ones."""
    import lpips as lpips_package

    torch.manual_seed(0)
    model = lpips_package.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False).eval()
    with torch.no_grad():
        for lin in model.lins:
            lin.model[1].weight.abs_()
    return model


def our_weights(model) -> tuple[dict, dict]:
    """The package module's weights under our keys: net.slice{n}.{k}.* → features.{k}.*, lin{k}.model.1.weight."""
    sd = model.state_dict()
    trunk = {"features." + k.split(".", 2)[2]: v.clone() for k, v in sd.items() if k.startswith("net.slice")}
    return trunk, {k: v.clone() for k, v in sd.items() if k.startswith("lin") and not k.startswith("lins")}


def test_lpips_matches_package(package, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("the parity test must not download weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    trunk, lin = our_weights(package)
    assert trunk.keys() == {f"features.{k}.{p}" for k in (0, 3, 6, 8, 10) for p in ("weight", "bias")}
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1, torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        for normalize, (a, b) in ((False, (x, y)), (True, ((x + 1) / 2, (y + 1) / 2))):
            theirs = package(a, b, normalize=normalize).flatten()
            ours = lpips(a, b, trunk, lin, normalize=normalize)
            assert ((ours - theirs).abs() / theirs.abs()).max() <= 1e-6
        src, edit = ((torch.rand(2, 3, 256, 256, generator=g) * 255).round() / 255 for _ in range(2))
        mask = (torch.rand(2, 1, 256, 256, generator=g) * 255).round() / 255
        theirs = package(src * mask * GRAY, edit * mask * GRAY).flatten()  # ns_lpips.py's call
        ours = ns_lpips(src, edit, mask[:, 0], trunk, lin, "paper")
    assert ((ours - theirs).abs() / theirs.abs()).max() <= 1e-6


def test_the_shipped_linear_layers_are_the_packages(metrics):
    import lpips as lpips_package

    released = torch.load(Path(lpips_package.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu",
                          weights_only=True)
    shipped = load_file(metrics.SHIPPED_PATH)
    assert shipped.keys() == released.keys() and all(torch.equal(shipped[k], released[k]) for k in released)
    assert sum(v.numel() for v in shipped.values()) == 1152
    assert "BSD" in (Path(metrics.SHIPPED_PATH).parent / "LPIPS_LICENSE").read_text()


@pytest.fixture
def lpips_folder(metrics, tmp_path, monkeypatch):
    """models/lpips in tmp_path for one test: random AlexNet features (plus a stand-in classifier key) as torchvision's
    .pth name, random lins as a .safetensors."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "lpips",
                        ([str(tmp_path)], folder_paths.folder_names_and_paths["lpips"][1]))
    g = torch.Generator().manual_seed(2)
    trunk = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in metrics.TRUNK.items()}
    lin = {k: torch.rand(shape, generator=g) for k, shape in metrics.LIN.items()}
    torch.save({**trunk, "classifier.1.weight": torch.zeros(4, 9216)}, tmp_path / TRUNK_FILE)
    save_file(lin, str(tmp_path / "alex_lin.safetensors"))
    return trunk, lin


def test_the_lpips_folder_is_registered(metrics):
    import folder_paths

    assert os.path.join(folder_paths.models_dir, "lpips") in folder_paths.get_folder_paths("lpips")


def pair(batch: int = 2):
    g = torch.Generator().manual_seed(3)
    a = torch.rand(batch, 96, 80, 3, generator=g)
    b = (a + 0.2 * torch.rand(batch, 96, 80, 3, generator=g)).clamp(0, 1)
    mask = torch.zeros(1, 96, 80)
    mask[:, 48:] = 1
    return a, b, mask


@pytest.mark.usefixtures("registered_nodes")
@pytest.mark.parametrize("mode", ["paper", "corrected"])
def test_ns_lpips_node_scores_the_batch(metrics, lpips_folder, mode):
    trunk, lin = lpips_folder
    a, b, mask = pair()
    inputs = dict(image_a=a, image_b=b, background_mask=mask, mode=mode, trunk_file=TRUNK_FILE,
                  lin_file="alex_lin.safetensors")
    assert metrics.ForgeditNSLPIPS.validate_inputs(mode=mode, trunk_file=TRUNK_FILE, lin_file=inputs["lin_file"]) is True
    value, = run_node("ForgeditNSLPIPS", **inputs)
    expected = ns_lpips(a.movedim(-1, 1), b.movedim(-1, 1), mask, trunk, lin, mode)
    assert value == pytest.approx(expected.mean().item(), rel=1e-5)
    text = run_output_node("ForgeditNSLPIPS", **inputs)
    assert text.startswith(f"NS-LPIPS ({mode}): {value:.4f} (mean of 2: ")
    assert all(f"{v:.4f}" in text for v in expected.tolist())


@pytest.mark.usefixtures("registered_nodes", "lpips_folder")
def test_ns_lpips_node_uses_the_shipped_lins_by_default(metrics):
    a, b, mask = pair(1)
    value, = run_node("ForgeditNSLPIPS", image_a=a, image_b=b, background_mask=mask, mode="paper", trunk_file=TRUNK_FILE)
    shipped, = run_node("ForgeditNSLPIPS", image_a=a, image_b=b, background_mask=mask, mode="paper",
                        trunk_file=TRUNK_FILE, lin_file=metrics.SHIPPED)
    assert value == shipped > 0
    assert metrics.SHIPPED in metrics.ForgeditNSLPIPS.GET_SCHEMA().inputs[-1].options


@pytest.mark.usefixtures("registered_nodes", "lpips_folder")
def test_missing_or_wrong_weight_files_are_named(metrics, tmp_path):
    a, b, mask = pair(1)
    verdict = metrics.ForgeditNSLPIPS.validate_inputs(mode="paper", trunk_file="alexnet.pth", lin_file=None)
    assert "trunk_file 'alexnet.pth' is not in models/lpips" in verdict and TRUNK_FILE in verdict
    with pytest.raises(ValueError, match=r"trunk_file 'alexnet.pth' is not in models/lpips: put torchvision's "
                                         r"AlexNet weights alexnet-owt-7be5be79.pth"):
        run_node("ForgeditNSLPIPS", image_a=a, image_b=b, background_mask=mask, mode="paper", trunk_file="alexnet.pth")
    with pytest.raises(ValueError, match=r"lin_file 'alex.pth' is not in models/lpips: put lpips v0.1's alex.pth"):
        run_node("ForgeditNSLPIPS", image_a=a, image_b=b, background_mask=mask, mode="paper", trunk_file=TRUNK_FILE,
                 lin_file="alex.pth")
    with pytest.raises(ValueError, match=r"alex_lin.safetensors is not the expected weight file: features.0.weight "
                                         r"\(64, 3, 11, 11\) is missing"):
        run_node("ForgeditNSLPIPS", image_a=a, image_b=b, background_mask=mask, mode="paper",
                 trunk_file="alex_lin.safetensors")
    with pytest.raises(ValueError, match="image_a is a batch of 1 but image_b of 2"):
        run_node("ForgeditNSLPIPS", image_a=a, image_b=torch.cat([b, b]), background_mask=mask, mode="paper",
                 trunk_file=TRUNK_FILE)


def test_word_columns_follow_comfyuis_tokens(metrics, scene):
    clip = scene["clip"]
    assert metrics.word_columns(clip, "a red disc on a blue gradient", "disc") == [3]
    assert metrics.word_columns(clip, "A red Disc on a blue gradient", "DISC") == [3]
    # storemask.py would take column 3 + 1 ('in') for 'forest': 'gnochi' is two tokens.
    assert metrics.word_columns(clip, "a gnochi in forest", "gnochi") == [2, 3]
    assert metrics.word_columns(clip, "a gnochi in forest", "forest") == [5]
    assert metrics.word_columns(clip, "a red ball.", "ball") == [3]
    with pytest.raises(ValueError, match=r"word 'log' is not in the prompt; its words are: a, catalog"):
        metrics.word_columns(clip, "a catalog", "log")


def test_paper_masks_are_storemasks_8_bit_pil_resize(metrics):
    """The reference's steps on a 16x16 map: 255·m/max as uint8, an RGB PIL image resized to 256² (Pillow's default
    filter for RGB is bicubic), background 255 − foreground; ours reads /255."""
    m = torch.rand(16, 16, generator=torch.Generator().manual_seed(4))
    image = (255 * m / m.max()).unsqueeze(-1).expand(16, 16, 3).numpy().astype(np.uint8)
    reference = np.array(Image.fromarray(image).resize((256, 256)))
    fg, bg = metrics.paper_masks(m)
    assert fg.shape == bg.shape == (1, 256, 256)
    assert torch.equal(fg[0] * 255, torch.from_numpy(reference[..., 0]).float())
    assert torch.equal(bg[0] * 255, torch.from_numpy(255 - reference[..., 0]).float())


def test_word_map_averages_steps_layers_and_heads(metrics):
    """Paper mode reads heads 4-7 of 8 only; the word's columns are averaged."""
    g = torch.Generator().manual_seed(5)
    maps = [[torch.rand(1, 8, 6, 77, generator=g) for _ in range(5)] for _ in range(3)]
    stacked = torch.stack([torch.stack(step) for step in maps])
    plain = metrics.word_map(maps, [2, 3], (2, 3), paper=False)
    assert torch.allclose(plain, stacked[..., [2, 3]].mean((0, 1, 2, 3, 5)).reshape(2, 3))
    paper = metrics.word_map(maps, [2], (2, 3), paper=True)
    assert torch.allclose(paper, stacked[:, :, :, 4:, :, 2].mean((0, 1, 2, 3)).reshape(2, 3))


def word_mask_inputs(scene, **settings) -> dict:
    return dict(model=scene["model"], clip=scene["clip"], vae=scene["vae"], image=scene["image"],
                prompt=INVERT["source_prompt"], word="disc", mode="plain", width=64, height=64, steps=4) | settings


@pytest.mark.usefixtures("registered_nodes")
def test_word_mask_node_on_the_tiny_scene(scene):
    fg, bg = run_node("ForgeditWordMask", **word_mask_inputs(scene))
    assert fg.shape == bg.shape == (1, 64, 64) and fg.min() >= 0 and fg.max() <= 1 and fg.max() > 0.9
    assert torch.allclose(fg + bg, torch.ones_like(fg))
    other, _ = run_node("ForgeditWordMask", **word_mask_inputs(scene, word="gradient"))
    assert not torch.allclose(other, fg)
    tall, _ = run_node("ForgeditWordMask", **word_mask_inputs(scene, height=96))
    assert tall.shape == (1, 96, 64)
    fg, bg = run_node("ForgeditWordMask", **word_mask_inputs(scene, mode="paper"))
    assert fg.shape == bg.shape == (1, 256, 256) and fg.min() >= 0 and fg.max() <= 1
    assert torch.allclose(fg + bg, torch.ones_like(fg)) and torch.allclose((fg * 255).round(), fg * 255, atol=1e-4)
    assert all(torch.equal(v, scene["base"][k]) for k, v in scene["model"].model.diffusion_model.state_dict().items())


@pytest.mark.usefixtures("registered_nodes")
def test_word_mask_refuses_a_word_not_in_the_prompt(metrics, scene):
    with pytest.raises(ValueError, match=r"word 'dog' is not in the prompt; its words are: a, red, disc, on, a, blue, "
                                         r"gradient"):
        run_node("ForgeditWordMask", **word_mask_inputs(scene, word="dog"))
    assert "width and height must be multiples of 8" in metrics.ForgeditWordMask.validate_inputs(width=100, height=64)
    assert metrics.ForgeditWordMask.validate_inputs(word=" ") == "word is empty"


@pytest.mark.parametrize("node_id", ["ForgeditNSLPIPS", "ForgeditWordMask"])
def test_each_help_page_names_every_input_and_output(metrics, node_id):
    """test_registry's check of the registered nodes' pages, for these two until the pack registers them."""
    schema = getattr(metrics, node_id).GET_SCHEMA()
    page = (DOCS / f"{node_id}.md").read_text(encoding="utf-8")
    assert page.startswith(f"# {schema.display_name}\n")
    for section in ("## Inputs", "## Outputs", "## Typical use", "## Common errors"):
        assert section in page
    assert [i.id for i in schema.inputs if f"`{i.id}`" not in page] == []
    assert [o.display_name for o in schema.outputs if f"`{o.display_name}`" not in page] == []
    assert schema.category == "forgedit/metrics" and schema.description and all(i.tooltip for i in schema.inputs)
