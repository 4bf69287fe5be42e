"""Forgedit P2P / P2Plus Edit on the tiny model from each kind of inversion: reconstruct gives the source twice, the
batched and separate calls agree, τ lists make one edit per combination, bad inputs are refused by name."""
import pytest
import torch
from conftest import run_node
from test_inversions import INVERT, scene  # noqa: F401  (scene: a fixture)

SMALL = dict(INVERT, steps=4)
EDIT = dict(target_prompt="a green disc on a blue gradient", edit_type="replace", tau_v="0.5", tau_c="0.6",
            tau_s="0.6", tau_u="0.5", blend_source_words="red", blend_target_words="green", blend_threshold=0.3,
            blend_start=0.2, reweight="green:2", aligner="reference", selfattn_levels="reference", batch_mode="together",
            guidance=0.0)


@pytest.fixture(scope="module")
def inversions(scene):
    common = dict(model=scene["model"], clip=scene["clip"], vae=scene["vae"], image=scene["image"], **SMALL)
    ddim, _ = run_node("ForgeditDDIMInversion", **common)
    nulltext, _ = run_node("ForgeditNullTextInversion", inner_steps=2, early_stop=False, precision="exact", **common)
    style, _ = run_node("ForgeditStyleDiffusionTrain", clip_vision=scene["clip_vision"], inner_steps=3,
                        attention_loss=True, early_stop=False, seed=0, precision="exact", **common)
    return {"ddim": ddim, "nulltext": nulltext, "stylediffusion": style}


def edit(scene, inversion, model=None, **changes):
    return run_node("ForgeditP2PEdit", model=model or scene["model"], clip=scene["clip"], vae=scene["vae"],
                    inversion=inversion, **{**EDIT, **changes})


@pytest.mark.parametrize("kind", ["ddim", "nulltext", "stylediffusion"])
def test_reconstruct_gives_the_inversions_reconstruction_twice(scene, inversions, kind):
    latent, images, grid = edit(scene, inversions[kind], edit_type="reconstruct")
    z = scene["model"].model.process_latent_in(latent["samples"])
    assert z.shape == (2, 4, 8, 8) and torch.equal(z[0], z[1]) and images.shape == (2, 64, 64, 3)
    expected = inversions[kind].reconstruction[0]
    assert (z[0] - expected).abs().max() < 1e-4 * expected.abs().max()


@pytest.mark.parametrize("kind", ["ddim", "nulltext", "stylediffusion"])
def test_batched_and_separate_calls_give_the_same_edit(scene, inversions, kind):
    together, _, _ = edit(scene, inversions[kind])
    separate, _, _ = edit(scene, inversions[kind], batch_mode="separate")
    z = together["samples"]
    assert (z - separate["samples"]).abs().max() < 1e-4 * z.abs().max()  # rounding, amplified by guidance 7.5
    assert not torch.allclose(z[0], z[1]), "the edit differs from the source"


def test_tau_lists_make_one_edit_per_combination(scene, inversions):
    latent, images, grid = edit(scene, inversions["stylediffusion"], tau_c="0.2, 0.8", tau_u="0, 0.5")
    assert latent["samples"].shape[0] == 8 and images.shape[0] == 8 and grid.shape[0] == 1
    z = latent["samples"]
    assert all(torch.equal(z[0], z[2 * k]) for k in range(4)), "the source row is the same each time"
    assert not torch.allclose(z[1], z[3])


@pytest.mark.parametrize("changes, message", [
    ({"target_prompt": "a green disc"}, "replace needs the same number of words"),
    ({"blend_target_words": "purple"}, "local blend word 'purple' is not a word of the prompt"),
    ({"target_prompt": "a (green:1.2) disc on a blue gradient"}, "weight syntax"),
    ({"reweight": "green"}, "reweight"),
    ({"tau_c": "1.5"}, "between 0 and 1"),
])
def test_bad_edits_are_refused_by_name(scene, inversions, changes, message):
    with pytest.raises(ValueError, match=message):
        edit(scene, inversions["ddim"], **changes)


def test_an_inversion_of_another_model_is_refused(scene, inversions):
    other = scene["model"].clone()
    other.add_patches({"diffusion_model.input_blocks.0.0.weight": (torch.ones(32, 4, 3, 3) * 1e-3,)}, 1.0)
    with pytest.raises(ValueError, match="made on another MODEL"):
        run_node("ForgeditP2PEdit", model=other, clip=scene["clip"], vae=scene["vae"],
                 inversion=inversions["ddim"], **EDIT)


def test_a_forgedit_fine_tune_edits_with_attention_control(scene, inversions, finetuned):
    """Forgedit Forget's MODEL, inverted and edited: the fine-tune's weights under Prompt-to-Prompt."""
    forgot, = run_node("ForgeditForget", model=scene["model"], result=finetuned, strategy="donotforget", degree=0.0,
                       forget_pattern="")
    inversion, _ = run_node("ForgeditDDIMInversion", model=forgot, clip=scene["clip"], vae=scene["vae"],
                            image=scene["image"], **SMALL)
    latent, _, _ = edit(scene, inversion, model=forgot)
    plain, _, _ = edit(scene, inversions["ddim"])
    assert latent["samples"].shape == (2, 4, 8, 8) and not torch.allclose(latent["samples"], plain["samples"])
    with pytest.raises(ValueError, match="made on another MODEL"):
        edit(scene, inversions["ddim"], model=forgot)


def test_the_editor_leaves_the_model_untouched_and_refuses_replaced_attention(scene, inversions):
    from conftest import assert_base_untouched

    options = repr(scene["model"].model_options)
    edit(scene, inversions["stylediffusion"])
    assert repr(scene["model"].model_options) == options
    assert_base_untouched(scene)
    patched = scene["model"].clone()
    patched.set_model_attn1_replace(lambda q, k, v, extra: q, "middle", 0)
    with pytest.raises(ValueError, match="already replaces the self-attention of middle 0"):
        edit(scene, inversions["ddim"], model=patched)
    with pytest.raises(ValueError, match="75 tokens"):
        edit(scene, inversions["ddim"], target_prompt=" ".join(["a green disc on a blue gradient"] * 12),
             edit_type="refine", blend_source_words="", blend_target_words="")


def test_empty_taus_take_the_inversion_kinds_defaults(scene, inversions):
    empty = dict(tau_v="", tau_c="", tau_s="", tau_u="")
    for kind, taus in (("nulltext", ("0", "0.8", "0.5", "0")), ("stylediffusion", ("0.5", "0.6", "0.6", "0"))):
        default, _, _ = edit(scene, inversions[kind], **empty)
        given, _, _ = edit(scene, inversions[kind], **dict(zip(empty, taus)))
        assert torch.equal(default["samples"], given["samples"])


def test_a_clip_of_another_width_is_named(scene, inversions):
    from tiny_models import tiny_clip

    with torch.inference_mode():
        wide = tiny_clip(width=48)
    with pytest.raises(ValueError, match="target_prompt's embedding is 48 wide, the inversion's 32"):
        run_node("ForgeditP2PEdit", model=scene["model"], clip=wide, vae=scene["vae"], inversion=inversions["ddim"],
                 **EDIT)
