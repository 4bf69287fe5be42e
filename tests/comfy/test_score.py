"""Forgedit Score in a real ComfyUI (design §1.5): CLIP features from ComfyUI's classes against transformers' CLIPModel
on a tiny random model in the HF layout; files without a text tower refused by name; a planted signal picked exactly
by each rule; Forgedit Sampler's sweep output scored on the tiny SD1.5 model."""
import pytest
import torch
import transformers
from conftest import run_node
from safetensors.torch import save_file

WIDTH, PROJECTION = 32, 16


@pytest.fixture(scope="module")
def score(comfy):
    return comfy.pack.nodes.score


@pytest.fixture(scope="module")
def hf_clip():
    """A random transformers CLIPModel (OpenAI layout: eos 49407, quick_gelu, 64-wide heads → 1), weights perturbed."""
    torch.manual_seed(0)
    text = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH + 5, num_attention_heads=1, num_hidden_layers=2,
                vocab_size=49408, max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406,
                pad_token_id=49407, hidden_act="quick_gelu")
    vision = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_attention_heads=1, num_hidden_layers=2,
                  image_size=28, patch_size=14, hidden_act="quick_gelu")
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_file(hf_clip, tmp_path_factory):
    sd = {k: v.contiguous() for k, v in hf_clip.state_dict().items() if "position_ids" not in k}
    folder = tmp_path_factory.mktemp("clip_vision")
    save_file(sd, str(folder / "tiny_clip_l.safetensors"))
    return folder / "tiny_clip_l.safetensors", sd


def features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


def test_features_match_transformers(score, hf_clip, hf_file):
    clip = score.load_score_clip(str(hf_file[0]))
    texts = ["a blue square on a red background", "a photo"]
    with torch.no_grad():
        expected = features(hf_clip.get_text_features(input_ids=clip.tokens(texts)))
    ours = clip.encode_text(texts)
    assert ours.shape == (2, PROJECTION) and (ours - expected).abs().max() <= 1e-5
    import comfy.clip_vision

    images = torch.rand(3, 40, 56, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = features(hf_clip.get_image_features(pixel_values=comfy.clip_vision.clip_preprocess(images, size=28)))
    ours = clip.encode_image(images)
    assert ours.shape == (3, PROJECTION) and (ours - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("drop, key", [("text_", "text_model.embeddings.token_embedding.weight"),
                                       ("text_projection", "text_projection.weight")])
def test_a_file_without_text_tower_or_projection_is_refused_by_name(score, hf_file, tmp_path, drop, key):
    sd = {k: v for k, v in hf_file[1].items() if not k.startswith(drop)}
    save_file(sd, str(tmp_path / "vision_only.safetensors"))
    with pytest.raises(ValueError, match="fidelity \\(CLIP image similarity\\) only") as error:
        score.load_score_clip(str(tmp_path / "vision_only.safetensors"))
    assert str(error.value).startswith(f"vision_only.safetensors has no CLIP text tower with its projection ({key} missing)")
    assert "clip-vit-large-patch14" in str(error.value)
    vision = score.load_score_clip(str(tmp_path / "vision_only.safetensors"), text=False)
    assert vision.encode_image(torch.rand(1, 28, 28, 3)).shape == (1, PROJECTION)


@pytest.fixture()
def clip_folder(hf_file, monkeypatch):
    """The tiny file as the only one in models/clip_vision."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "clip_vision",
                        ([str(hf_file[0].parent)], folder_paths.folder_names_and_paths["clip_vision"][1]))
    return hf_file[0].name


class Planted:
    """A "CLIP" whose image feature is (brightness, 1 − brightness) and whose text points at brightness."""

    def encode_text(self, texts):
        return torch.tensor([[1.0, 0.0]] * len(texts))

    def encode_image(self, images):
        b = images.mean(dim=(1, 2, 3))
        return torch.stack([b, 1 - b], dim=1)


@pytest.mark.parametrize("rule, expected", [("threshold", 0.6), ("knee", 0.5), ("min fidelity", 0.4)])
def test_planted_signal_is_picked_exactly(score, clip_folder, monkeypatch, rule, expected):
    import math

    gammas = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    levels = {g: 0.1 + 0.8 / (1 + math.exp(-(g - 0.5) / 0.06)) for g in gammas}
    cells = [(g, s) for s in (0, 1) for g in reversed(gammas)]  # unsorted on purpose
    images = torch.stack([torch.full((16, 16, 3), levels[g] + 0.01 * s) for g, s in cells])
    sweep = score.SweepData(images, [g for g, _ in cells], [None] * len(cells), [s for _, s in cells], "vs")
    source = torch.full((1, 16, 16, 3), 0.1)
    monkeypatch.setattr(score, "load_score_clip", lambda path: Planted())
    gamma, alpha, image, plot, table = run_node(
        "ForgeditScore", sweep=sweep, source_image=source, target_prompt="bright", clip_name=clip_folder, rule=rule,
        tau=0.8, min_fidelity=0.9, min_rise=0.5)
    t = {g: 100 * levels[g] / math.hypot(levels[g], 1 - levels[g]) for g in gammas}  # seed 0; seed 1 nearly equal
    f = {g: (0.1 * levels[g] + 0.9 * (1 - levels[g])) / math.hypot(0.1, 0.9) / math.hypot(levels[g], 1 - levels[g])
         for g in gammas}
    assert gamma == expected and alpha == 0.0
    if rule == "min fidelity":
        assert f[0.4] >= 0.9 > f[0.5]
    if rule == "threshold":
        assert (t[0.5] - t[0.2]) / (t[0.8] - t[0.2]) < 0.8 <= (t[0.6] - t[0.2]) / (t[0.8] - t[0.2])
    assert image.shape == (1, 16, 16, 3) and abs(image.mean().item() - levels[expected]) < 0.02
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and len(table.splitlines()) == 2 + len(gammas)


@pytest.fixture(scope="module")
def sampled(tiny, finetuned):
    model, = run_node("ForgeditForget", model=tiny["model"], result=finetuned, strategy="encoderattn", degree=0.0)
    target, = run_node("CLIPTextEncode", clip=tiny["clip"], text="a blue square")
    return run_node("ForgeditSampler", model=model, result=finetuned, target=target, vae=tiny["vae"], mode="vp",
                    gammas="0.8, 1.0, 1.2", alphas="0.6, 0.9", seeds="5, 6", steps=2, cfg=7.5,
                    sampler_name="euler", scheduler="normal", batch_size=12)


def test_sampler_sweep_output_and_score_on_the_tiny_model(score, tiny, sampled, clip_folder):
    latent, images, grid, sweep = sampled
    assert isinstance(sweep, score.SweepData) and torch.equal(sweep.images, images) and sweep.mode == "vp"
    assert sweep.seeds == [5] * 6 + [6] * 6 and sweep.alphas[:6] == [0.6] * 3 + [0.9] * 3
    assert sweep.gammas[:6] == [0.8, 1.0, 1.2] * 2
    runs = [run_node("ForgeditScore", sweep=sweep, source_image=tiny["image"], target_prompt="a blue square",
                     clip_name=clip_folder, rule=rule, tau=0.8, min_fidelity=0.5, min_rise=0.0,
                     source_prompt="a red disc") for rule in ("threshold", "threshold", "knee", "min fidelity")]
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1] and runs[0][4] == runs[1][4]
    assert torch.equal(runs[0][3], runs[1][3])
    for gamma, alpha, image, plot, table in runs:
        assert gamma in (0.8, 1.0, 1.2) and alpha in (0.6, 0.9)
        assert image.shape == (1, 64, 64, 3) and plot.shape[0] == 1
        lines = table.splitlines()
        assert len(lines) == 2 + 6 and "direction" in lines[1] and sum(line.endswith("*") for line in lines) == 1


def test_queue_time_checks(score, clip_folder):
    node = score.ForgeditScore
    assert node.validate_inputs(target_prompt="x", clip_name=clip_folder, rule="knee") is True
    assert "not in models/clip_vision" in node.validate_inputs(target_prompt="x", clip_name="nope.safetensors")
    assert "target_prompt is empty" in node.validate_inputs(target_prompt=" ", clip_name=clip_folder)
    assert "rule 'best'" in node.validate_inputs(target_prompt="x", rule="best")
    assert node.validate_inputs() is True


def test_no_checkpoint_clip_is_read(score):
    """The SD1.x trap (design §1.3): the node takes no CLIP, so the checkpoint's uninitialised text_projection (the
    projected pooled output) cannot reach a score; text features come from the clip_vision file's own projection."""
    types = {i.get_io_type() for i in score.ForgeditScore.define_schema().inputs}
    assert "CLIP" not in types and "CONDITIONING" not in types
