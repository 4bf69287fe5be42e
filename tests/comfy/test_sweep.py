"""Forgedit Sampler's sweep in a real ComfyUI: every cell is the image core KSampler makes alone at its seed, whatever
the batch; Forget's mark; negative checks."""
import dataclasses
import logging

import pytest
import torch
from conftest import run_node

LONG_PROMPT = "a photo of " + "a very small red disc and " * 20
SAMPLERS = ["ddim", "euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "lcm",
            "dpm_2_ancestral", "dpmpp_sde_gpu", "dpm_adaptive"]


@pytest.fixture(scope="module")
def prompts(tiny):
    target, = run_node("CLIPTextEncode", clip=tiny["clip"], text="a blue square")
    empty, = run_node("CLIPTextEncode", clip=tiny["clip"], text="")
    return {"target": target, "empty": empty}


@pytest.fixture(scope="module")
def edited(tiny, finetuned):
    model, = run_node("ForgeditForget", model=tiny["model"], result=finetuned, strategy="encoderattn", degree=0.0)
    return model


def sweep(model, result, target, vae, **overrides):
    inputs = dict(model=model, result=result, target=target, vae=vae, mode="vs", gammas="0.4, 0.9", alphas="0.7",
                  seeds="5, 6", steps=3, cfg=7.5, sampler_name="euler_ancestral", scheduler="normal", batch_size=4)
    latent, _, _, _ = run_node("ForgeditSampler", **{**inputs, **overrides})
    return latent["samples"]


def core_ksampler(comfy, model, result, prompts, gamma, seed, sampler_name, steps=3):
    """Core KSampler on one 64x64 image, conditioned by Forgedit Interpolate (attention as Forgedit Sampler's)."""
    cond, = run_node("ForgeditInterpolate", result=result, target=prompts["target"], mode="vs", gammas=gamma, alphas="0.7")
    empty, = run_node("EmptyLatentImage", width=64, height=64, batch_size=1)
    latent, = run_node("KSampler", model=comfy.pack.nodes.common.sdpa_on_cpu(model), seed=seed, steps=steps, cfg=7.5,
                       sampler_name=sampler_name, scheduler="normal", positive=cond, negative=prompts["empty"],
                       latent_image=empty, denoise=1.0)
    return latent["samples"]


def close(a, b, rel=1e-5):
    return (a - b).abs().max() <= rel * b.abs().max()


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_a_cell_is_the_same_image_in_a_batch_alone_and_in_core_ksampler(comfy, tiny, finetuned, prompts, edited,
                                                                         sampler_name):
    batch = sweep(edited, finetuned, prompts["target"], tiny["vae"], sampler_name=sampler_name, negative=prompts["empty"])
    alone = sweep(edited, finetuned, prompts["target"], tiny["vae"], sampler_name=sampler_name, negative=prompts["empty"],
                  gammas="0.9", seeds="6", batch_size=1)
    core = core_ksampler(comfy, edited, finetuned, prompts, "0.9", 6, sampler_name)
    assert batch.shape == (4, 4, 8, 8)
    assert close(batch[3:], alone) and close(alone, core)
    assert not close(batch[2:3], batch[3:], rel=1e-3)  # its neighbour: same seed, another gamma


@pytest.mark.parametrize("sampler_name", ["euler_ancestral", "dpmpp_sde"])
def test_twin_cells_in_one_batch_are_equal_and_any_batch_size_gives_the_same_sweep(tiny, finetuned, prompts, edited,
                                                                                    sampler_name):
    run = dict(sampler_name=sampler_name, gammas="0.9, 0.9", seeds="5, 6")
    four = sweep(edited, finetuned, prompts["target"], tiny["vae"], **run)
    three = sweep(edited, finetuned, prompts["target"], tiny["vae"], **run, batch_size=3)
    assert close(four[0], four[1]) and close(four[2], four[3]) and not close(four[1], four[2], rel=1e-3)
    assert close(three, four)


def test_vp_sweep_is_alpha_major_like_interpolate(tiny, finetuned, prompts, edited):
    cond, = run_node("ForgeditInterpolate", result=finetuned, target=prompts["target"], mode="vp", gammas="1.0, 1.2",
                     alphas="0.7, 0.9")
    vs, = run_node("ForgeditInterpolate", result=finetuned, target=prompts["target"], mode="vs", gammas="0.5, 0.6",
                   alphas="not read in vs")
    assert cond[0][0].shape == (4, 77, 32) and cond[0][1]["pooled_output"].shape[0] == 4
    assert vs[0][0].shape == (2, 77, 32)
    one, = run_node("ForgeditInterpolate", result=finetuned, target=prompts["target"], mode="vp", gammas="1.0",
                    alphas="0.9")
    assert torch.equal(cond[0][0][2], one[0][0][0])
    latent, _, grid, _ = run_node("ForgeditSampler", model=edited, result=finetuned, target=prompts["target"],
                               vae=tiny["vae"], mode="vp", gammas="1.0, 1.2", alphas="0.7, 0.9", seeds="5", steps=2,
                               cfg=7.5, sampler_name="euler", scheduler="normal", batch_size=4)
    alone = sweep(edited, finetuned, prompts["target"], tiny["vae"], mode="vp", gammas="1.0", alphas="0.9", seeds="5",
                  steps=2, sampler_name="euler", batch_size=1)
    assert latent["samples"].shape[0] == 4 and close(latent["samples"][2:3], alone)
    assert grid.shape[2] > 4 * 64


def test_forget_that_forgot_everything_still_feeds_the_sampler(comfy, tiny, finetuned, prompts, caplog):
    with caplog.at_level(logging.WARNING):
        base, = run_node("ForgeditForget", model=tiny["model"], result=finetuned, strategy="custom (regex)", degree=0.0,
                         forget_pattern=".")
    assert len(base.patches) == 0 and "nothing learned remains" in caplog.text
    edit = sweep(base, finetuned, prompts["target"], tiny["vae"], sampler_name="euler", gammas="0.9", seeds="6",
                 batch_size=1, negative=prompts["empty"])
    assert close(edit, core_ksampler(comfy, tiny["model"], finetuned, prompts, "0.9", 6, "euler"))


def test_the_sampler_wants_the_model_forget_made_for_this_result(tiny, finetuned, prompts, edited):
    with pytest.raises(ValueError, match="connect the MODEL output of Forgedit Forget"):
        sweep(tiny["model"], finetuned, prompts["target"], tiny["vae"])
    with pytest.raises(ValueError, match="connect the MODEL output of Forgedit Forget"):
        sweep(edited, dataclasses.replace(finetuned), prompts["target"], tiny["vae"])  # an equal but other result
    lora_like = edited.clone()
    assert sweep(lora_like, finetuned, prompts["target"], tiny["vae"], steps=1, gammas="0.5", seeds="1").shape[0] == 1


def test_negative_is_checked_like_the_target(tiny, finetuned, prompts, edited):
    long, = run_node("CLIPTextEncode", clip=tiny["clip"], text=LONG_PROMPT)
    wide = [[torch.zeros(1, 77, 16), {}]]
    for negative, message in [([], "negative is empty"),
                              (prompts["empty"] + prompts["empty"], "negative must be one prompt"),
                              (long, "negative prompt is longer than one 77-token window"),
                              (wide, "negative embedding width 16 does not match")]:
        with pytest.raises(ValueError, match=message):
            sweep(edited, finetuned, prompts["target"], tiny["vae"], negative=negative)


@pytest.mark.parametrize("overrides, message", [
    ({"sampler_name": "nope"}, "sampler_name 'nope' is not a ComfyUI sampler"),
    ({"scheduler": "nope"}, "scheduler 'nope' is not forgedit_reference or a ComfyUI scheduler"),
    ({"mode": "xx"}, "mode must be 'vs' or 'vp'"),
    ({"seeds": "1.5"}, "seeds: '1.5' is not a seed"),
    ({"gammas": "0.5,,0.7"}, "gammas: item 2 of '0.5,,0.7' is empty"),
])
def test_a_direct_call_fails_clearly(tiny, finetuned, prompts, edited, overrides, message):
    with pytest.raises(ValueError, match=message):
        sweep(edited, finetuned, prompts["target"], tiny["vae"], **overrides)
