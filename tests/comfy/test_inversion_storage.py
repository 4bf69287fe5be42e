"""Forgedit Inversion Save / Load and StyleDiffusion Import (design §7.2, §8.3): exact fp32 round trips, fp16 mapping,
each loader refusing the other's files by name, and official checkpoints read without running foreign code."""
import dataclasses
import os
from pathlib import Path

import pytest
import torch
from conftest import run_node
from forgedit_ops.result import ForgeditResult
from forgedit_ops.stylediffusion import MappingNet
from forgedit_ops.stylediffusion_import import read_official_mappings
from test_inversions import INVERT, reconstruction_error, scene  # noqa: F401  (scene: a fixture)
from test_storage import options, run_output_node
from torch import nn

SMALL = dict(INVERT, steps=4)


def model_folders(monkeypatch, root: Path) -> dict[str, Path]:
    """models/stylediffusion and models/forgedit inside root, for as long as monkeypatch holds."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    paths = {}
    for name in ("stylediffusion", "forgedit"):
        paths[name] = root / name
        paths[name].mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name,
                            ([str(paths[name])], folder_paths.folder_names_and_paths[name][1]))
    return paths


@pytest.fixture
def folders(comfy, tmp_path, monkeypatch):
    return model_folders(monkeypatch, tmp_path)


def official_mapping(seed: int) -> nn.ModuleDict:
    """One mapping network as the official trainer builds it (BatchNorm in training mode), with random weights and
    running statistics."""
    torch.manual_seed(seed)
    net = nn.ModuleDict({"conv_start": nn.Conv1d(197, 154, 1), "conv_block": nn.Sequential(nn.Sequential(
        nn.Conv1d(154, 154, 1), nn.BatchNorm1d(154), nn.LeakyReLU())), "conv_end": nn.Conv1d(154, 154, 1)})
    norm = net["conv_block"][0][1]
    for t in (norm.weight, norm.bias, norm.running_mean):
        nn.init.normal_(t)
    nn.init.uniform_(norm.running_var, 0.5, 2)
    return net.train()


def write_official(folder: Path, steps: int = 4) -> tuple[Path, list]:
    """An official-style checkpoint of `steps` mapping networks in folder, and its modules."""
    nets = [official_mapping(i) for i in range(steps)]
    path = folder / "model-inner100-epoch1-learnv-0.pth"
    torch.save(nets, path)
    return path, nets


def import_inputs(scene, pth_file: str) -> dict:
    return dict(model=scene["model"], clip=scene["clip"], vae=scene["vae"], image=scene["image"],
                clip_vision=scene["clip_vision"], pth_file=pth_file, **SMALL)


@pytest.fixture(scope="module")
def imported(scene, tmp_path_factory):
    """The tiny scene through Forgedit StyleDiffusion Import of a 4-step official-style checkpoint."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        paths = model_folders(monkeypatch, tmp_path_factory.mktemp("models"))
        path, _ = write_official(paths["stylediffusion"])
        inversion, = run_node("ForgeditStyleDiffusionImport", **import_inputs(scene, path.name))
    return inversion


@pytest.fixture(scope="module")
def inversions(imported):
    """A StyleDiffusion inversion with per-iteration losses as training records them (tuples), and a null-text one."""
    losses = [(i, 0.1 / (i + 1), 0.01) for i in range(4)]
    nulls = torch.randn(4, 77, imported.source_embedding.shape[-1], generator=torch.Generator().manual_seed(0))
    return {"stylediffusion": dataclasses.replace(imported, metadata={**imported.metadata, "losses": losses}),
            "nulltext": dataclasses.replace(imported, kind="nulltext", image_features=None, mapping=[],
                                            null_embeddings=nulls, metadata={**imported.metadata, "losses": [0.5, 0.25]})}


def load(name, ignore_base_mismatch=False):
    inversion, = run_node("ForgeditInversionLoad", file=name, ignore_base_mismatch=ignore_base_mismatch)
    return inversion


def tensors(inv) -> dict[str, torch.Tensor]:
    """Every tensor an inversion holds, by name."""
    named = {k: getattr(inv, k) for k in ("x_T", "source_embedding", "uncond_embedding", "null_embeddings",
                                          "image_features", "reconstruction") if getattr(inv, k) is not None}
    return named | {f"mapping.{i}.{k}": t for i, sd in enumerate(inv.mapping) for k, t in sd.items()}


def data_bytes(path: str) -> int:
    """The size of a safetensors file's tensor data (its header left out)."""
    with open(path, "rb") as f:
        return os.path.getsize(path) - 8 - int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("kind", ["nulltext", "stylediffusion"])
def test_fp32_round_trip_is_exact(inversions, folders, kind):
    inv = inversions[kind]
    path = run_output_node("ForgeditInversionSave", inversion=inv, filename_prefix="inversion", dtype="fp32")
    assert path == str(folders["stylediffusion"] / "inversion_00001_.safetensors")
    assert options("ForgeditInversionLoad", "file") == ["inversion_00001_.safetensors"]
    loaded = load("inversion_00001_.safetensors", ignore_base_mismatch=True)
    assert loaded.kind == kind and loaded.accept_any_base and loaded.metadata == inv.metadata
    expected, got = tensors(inv), tensors(loaded)
    assert got.keys() == expected.keys() and len(loaded.mapping) == len(inv.mapping)
    assert all(torch.equal(got[k], t) and got[k].dtype == torch.float32 for k, t in expected.items())
    assert not load("inversion_00001_.safetensors").accept_any_base


def test_fp16_mapping_is_close_and_the_rest_exact(inversions, folders):
    inv = inversions["stylediffusion"]
    half = run_output_node("ForgeditInversionSave", inversion=inv, filename_prefix="sd/half", dtype="fp16")
    full = run_output_node("ForgeditInversionSave", inversion=inv, filename_prefix="sd/full", dtype="fp32")
    mapping_bytes = sum(t.numel() for sd in inv.mapping for t in sd.values()) * 2
    assert data_bytes(full) - data_bytes(half) == mapping_bytes
    loaded = tensors(load(os.path.join("sd", "half_00001_.safetensors")))
    for k, t in tensors(inv).items():
        if k.startswith("mapping."):
            assert (loaded[k] - t).norm() <= 1e-3 * t.norm(), k
        else:
            assert torch.equal(loaded[k], t), k


def test_each_loader_refuses_the_others_file_by_name(inversions, folders):
    saved = run_output_node("ForgeditInversionSave", inversion=inversions["nulltext"], filename_prefix="inversion",
                            dtype="fp32")
    e = inversions["nulltext"].source_embedding
    small = ForgeditResult({"input_blocks.4.1.proj_in.weight": torch.ones(2, 2)}, e, e.clone(), {"seed": 0})
    result = run_output_node("ForgeditSave", result=small, filename_prefix="forgedit", dtype="fp16")
    os.replace(saved, folders["forgedit"] / "inversion.safetensors")
    os.replace(result, folders["stylediffusion"] / "result.safetensors")
    with pytest.raises(ValueError, match="inversion.safetensors is a Forgedit inversion.*Forgedit Inversion Load"):
        run_node("ForgeditLoad", file="inversion.safetensors", ignore_base_mismatch=False)
    with pytest.raises(ValueError, match="result.safetensors is a Forgedit fine-tune result.*with Forgedit Load"):
        load("result.safetensors")


@pytest.fixture
def official(folders) -> tuple[Path, list]:
    return write_official(folders["stylediffusion"])


def test_official_checkpoint_imports_to_the_same_gamma_and_beta(official):
    path, nets = official
    mappings = read_official_mappings(str(path))
    assert len(mappings) == 4 and all(list(sd) == list(MappingNet().state_dict()) for sd in mappings)
    features = torch.randn(1, 197, 768)
    for net, sd in zip(nets, mappings):
        ours = MappingNet()
        ours.load_state_dict(sd)
        with torch.no_grad():
            expected = net["conv_end"](net["conv_block"](net["conv_start"](features))).chunk(2, dim=1)
            got = ours(features)
        assert all((g - e).abs().max() <= 1e-5 for g, e in zip(got, expected))


def write_marker(path: str) -> None:
    Path(path).write_text("this ran")


class Foreign(nn.Module):
    """A module class of this test, not of the official checkpoints."""


class Reduces:
    """Unpickles by calling `call(*args)`: the classic pickle that runs code."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def test_foreign_pickles_are_refused_unrun(folders, tmp_path):
    marker = tmp_path / "marker"
    for name, payload, found in [("foreign", [Foreign()], "Foreign"),
                                 ("writes", [Reduces(write_marker, str(marker))], "write_marker"),
                                 ("shell", [Reduces(os.system, f"touch {marker}")], "system")]:
        path = folders["stylediffusion"] / f"{name}.pth"
        torch.save(payload, path)
        with pytest.raises(ValueError, match=f"{name}.pth is not an official StyleDiffusion checkpoint .*{found}"):
            read_official_mappings(str(path))
    assert not marker.exists()


def test_wrong_layouts_are_explained(folders):
    narrow = official_mapping(0)
    narrow["conv_start"] = nn.Conv1d(77, 154, 1)
    for name, payload, message in [
            ("state_dict", official_mapping(0).state_dict(), "holds an object of type OrderedDict, not the list"),
            ("empty", [], "holds an empty list, not the list"),
            ("conv", [nn.Conv1d(197, 154, 1)], "entry 0 is not an official StyleDiffusion mapping network.*found Conv1d"),
            ("narrow", [official_mapping(1), narrow], r"entry 1 is not .*'conv_start.weight': \(154, 77, 1\)")]:
        path = folders["stylediffusion"] / f"{name}.pth"
        torch.save(payload, path)
        with pytest.raises(ValueError, match=f"{name}.pth.*{message}"):
            read_official_mappings(str(path))


def test_import_gives_an_inversion_usable_like_a_trained_one(scene, comfy, imported, official):
    path, _ = official
    assert options("ForgeditStyleDiffusionImport", "pth_file") == [path.name]
    ddim, _ = run_node("ForgeditDDIMInversion", model=scene["model"], clip=scene["clip"], vae=scene["vae"],
                       image=scene["image"], **SMALL)
    assert imported.kind == "stylediffusion" and len(imported.mapping) == imported.metadata["steps"] == 4
    assert imported.metadata["imported"] == path.name and "pth_file" not in imported.metadata
    assert imported.metadata["base_fingerprint"] == ddim.metadata["base_fingerprint"]
    assert torch.equal(imported.x_T, ddim.x_T) and imported.image_features.shape == (1, 197, 32)
    assert all(torch.equal(sd[k], t) for sd, ref in zip(imported.mapping, read_official_mappings(str(path)))
               for k, t in ref.items())
    assert torch.isfinite(torch.tensor(reconstruction_error(scene, comfy, imported)))
    with pytest.raises(ValueError, match=f"{path.name} holds 4 mapping networks, one per DDIM step: set steps to 4"):
        run_node("ForgeditStyleDiffusionImport", **dict(import_inputs(scene, path.name), steps=5))


def test_unlisted_files_are_refused_at_queue_time(comfy, official):
    path, _ = official
    load_node = comfy.nodes.NODE_CLASS_MAPPINGS["ForgeditInversionLoad"]
    import_node = comfy.nodes.NODE_CLASS_MAPPINGS["ForgeditStyleDiffusionImport"]
    assert "file 'gone.safetensors' is not one of" in load_node.validate_inputs(file="gone.safetensors")
    assert import_node.validate_inputs(pth_file=path.name, width=64, height=64, source_prompt="a dog") is True
    assert "pth_file 'gone.pth' is not one of" in import_node.validate_inputs(pth_file="gone.pth")
    assert "multiples of 8" in import_node.validate_inputs(pth_file=path.name, width=100, height=64)
