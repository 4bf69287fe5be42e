"""SD 2.x through every Forgedit mode on the tiny SD 2.x-layout v-prediction MODEL with ComfyUI's SD 2.x CLIP: the
methods train v, DreamBooth-Forgedit trains the OpenCLIP-H tower up to the layer it reads, Save / Load, Forget, the
sweep and the LoRA export carry over; other families and samplings are refused by name. (Parity with diffusers:
test_parity.py; learning: test_learning.py; the SD 2.1 forgetting sets: test_forgetting.py; a real SD 2.x checkpoint
through the vanilla workflow: test_runner.py.)"""
import logging

import comfy.model_management
import pytest
import torch
from conftest import FINETUNE, assert_base_untouched, run_node
from test_dreambooth import DREAMBOOTH
from test_imagic import IMAGIC
from test_storage import folders, load, run_output_node, weights  # noqa: F401  (folders: fixture)


def inputs(tiny_v, **settings) -> dict:
    return dict(model=tiny_v["model"], clip=tiny_v["clip"], vae=tiny_v["vae"], image=tiny_v["image"], **settings)


@pytest.fixture(scope="module")
def finetuned_v(tiny_v):
    result, = run_node("ForgeditFinetune", **inputs(tiny_v, **FINETUNE))
    return result


@pytest.fixture(scope="module")
def dreambooth_v(tiny_v):
    base_clip = {k: v.clone() for k, v in tiny_v["clip"].cond_stage_model.state_dict().items()}
    result, clip = run_node("ForgeditDreamBooth", **inputs(tiny_v, **{**DREAMBOOTH, "text_lr": 1e-3}))
    return result, clip, base_clip


def test_the_fine_tunes_train_the_v_objective(tiny_v, finetuned_v, caplog):
    with caplog.at_level(logging.WARNING):
        imagic, = run_node("ForgeditImagic", **inputs(tiny_v, **IMAGIC))
    assert "SD 2.x v-prediction model was trained at 768x768; 64x64 fine-tunes and samples worse" in caplog.text
    for result, method, tensors in [(finetuned_v, "forgedit", 518), (imagic, "imagic", 686)]:
        assert result.metadata["method"] == method and result.metadata["prediction"] == "v"
        assert len(result.deltas) == tensors and result.source_embedding.shape == (1, 77, 32)
        assert sum(bool(d.abs().max() > 0) for d in result.deltas.values()) > 0.9 * tensors
    assert_base_untouched(tiny_v)


def test_dreambooth_trains_the_sd2_text_tower_up_to_the_layer_it_reads(tiny_v, dreambooth_v):
    result, clip, base_clip = dreambooth_v
    tower = "clip_h.transformer.text_model."
    assert result.metadata["prediction"] == "v" and all(k.startswith(tower) for k in result.text_deltas)
    assert {f"{tower}encoder.layers.1.mlp.fc2.weight", f"{tower}final_layer_norm.weight"} <= set(result.text_deltas)
    assert not any(".layers.2." in k for k in result.text_deltas)  # 3 layers, read at the penultimate
    assert all(d.abs().max() > 0 for d in result.text_deltas.values())
    tuned, = run_node("CLIPTextEncode", clip=clip, text=FINETUNE["source_prompt"])
    assert torch.allclose(tuned[0][0], result.source_embedding, atol=1e-5)
    comfy.model_management.unload_all_models()
    now = tiny_v["clip"].cond_stage_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base_clip.items())
    assert_base_untouched(tiny_v)


def test_dreambooth_reads_the_layer_clip_set_last_layer_picks(tiny_v):
    clip, = run_node("CLIPSetLastLayer", clip=tiny_v["clip"], stop_at_clip_layer=-3)
    result, _ = run_node("ForgeditDreamBooth", **{**inputs(tiny_v, **{**DREAMBOOTH, "samples": 4}), "clip": clip})
    source, = run_node("CLIPTextEncode", clip=clip, text=FINETUNE["source_prompt"])
    assert not any(".layers.1." in k or ".layers.2." in k for k in result.text_deltas)
    assert any(".layers.0." in k for k in result.text_deltas)
    assert not torch.allclose(source[0][0], result.source_embedding, atol=1e-4)


def test_save_load_forget_sweep_and_lora_export_carry_over(tiny_v, finetuned_v, folders, caplog):
    run_output_node("ForgeditSave", result=finetuned_v, filename_prefix="sd2", dtype="fp32")
    loaded = load("sd2_00001_.safetensors")
    assert loaded.metadata["prediction"] == "v"
    assert all(torch.equal(loaded.deltas[k], d) for k, d in finetuned_v.deltas.items())
    target, = run_node("CLIPTextEncode", clip=tiny_v["clip"], text="a blue square")
    conditioning, = run_node("ForgeditInterpolate", result=loaded, target=target, mode="vs", gammas="0.5, 1.0",
                             alphas="0.7")
    assert conditioning[0][0].shape == (2, 77, 32)
    assert torch.allclose(conditioning[0][0][1], target[0][0][0])
    edited, = run_node("ForgeditForget", model=tiny_v["model"], result=loaded, strategy="encoderattn", degree=0.0)
    latent, images, _, _ = run_node("ForgeditSampler", model=edited, result=loaded, target=target, vae=tiny_v["vae"],
                                    mode="vp", gammas="0.5, 1.0", alphas="0.7", seeds="0", steps=3, cfg=7.5,
                                    sampler_name="ddim", scheduler="forgedit_reference", batch_size=2)
    assert latent["samples"].shape == (2, 4, 8, 8) and torch.isfinite(latent["samples"]).all()

    run_output_node("ForgeditExportLora", result=finetuned_v, strategy="encoderattn", degree=0.0,
                    filename_prefix="forgedit/sd2", dtype="fp32")
    with caplog.at_level(logging.WARNING):
        lora, = run_node("LoraLoaderModelOnly", model=tiny_v["model"], lora_name="forgedit/sd2_00001_.safetensors",
                         strength_model=1.0)
    assert "lora key not loaded" not in caplog.text
    got, expected = weights(lora), weights(edited)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert_base_untouched(tiny_v)


# What each family's UNet takes besides SD 2.x's: the unCLIP image embedding, Lotus' task vector, inpainting's mask.
OTHER_FAMILIES = {"SD21UnclipH": {"adm_in_channels": 2048, "num_classes": "sequential"},
                  "LotusD": {"adm_in_channels": 4, "num_classes": "sequential"}, "SD20": {"in_channels": 9}}


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_other_sd2_derived_families_are_refused_by_name(tiny_v, family):
    import comfy.supported_models
    from tiny_models import tiny_sd2_model

    config_cls = getattr(comfy.supported_models, family)
    with torch.inference_mode():
        model = tiny_sd2_model(prediction="eps", config_cls=config_cls, extra=OTHER_FAMILIES[family])
    with pytest.raises(ValueError, match=f"SD 1.x and SD 2.x text-to-image checkpoints.*this MODEL is "
                                         f"{config_cls.__name__}.*SD 2 unCLIP"):
        run_node("ForgeditFinetune", **{**inputs(tiny_v, **FINETUNE), "model": model})


@pytest.mark.parametrize("sampling", ["lcm", "x0"])
def test_a_patched_sampling_is_refused(tiny_v, sampling):
    patched, = run_node("ModelSamplingDiscrete", model=tiny_v["model"], sampling=sampling, zsnr=False)
    with pytest.raises(ValueError, match="ε- or v-prediction model with a discrete schedule.*Remove the ModelSampling"):
        run_node("ForgeditFinetune", **{**inputs(tiny_v, **FINETUNE), "model": patched})


def test_an_sd1_model_sampled_as_v_trains_v(tiny, caplog):
    vpred, = run_node("ModelSamplingDiscrete", model=tiny["model"], sampling="v_prediction", zsnr=False)
    result, = run_node("ForgeditFinetune", **inputs(tiny, **{**FINETUNE, "samples": 4}))
    with caplog.at_level(logging.WARNING):
        v_result, = run_node("ForgeditFinetune", **{**inputs(tiny, **{**FINETUNE, "samples": 4}), "model": vpred})
    assert (result.metadata["prediction"], v_result.metadata["prediction"]) == ("eps", "v")
    assert "768x768" not in caplog.text  # SD 1.x v fine-tunes are 512 models
    assert v_result.metadata["losses"] != result.metadata["losses"]


def test_an_sd2_512_base_model_trains_eps(tiny_v):
    from tiny_models import tiny_sd2_model

    with torch.inference_mode():
        base = tiny_sd2_model(prediction="eps")
    result, = run_node("ForgeditFinetune", **{**inputs(tiny_v, **{**FINETUNE, "samples": 4}), "model": base})
    assert result.metadata["prediction"] == "eps" and len(result.deltas) == 518


@pytest.mark.parametrize("node", ["ForgeditDDIMInversion", "ForgeditNullTextInversion"])
def test_the_inversions_refuse_sd2_by_name(tiny_v, node):
    with pytest.raises(ValueError, match="run on SD 1.x ε-prediction checkpoints.*this MODEL is SD20"):
        run_node(node, **inputs(tiny_v, source_prompt="a red disc", width=64, height=64, steps=2))
