"""Forgetting sets on the full SD1.5 and SD2.1 UNet topologies (shapes only) and the degree c on a real ComfyUI MODEL."""
import pytest
import torch
from conftest import run_node
from forgedit_ops.forgetting import STRATEGIES, forget_rule, is_trained

# Forgedit spec §5 / parity notes §4: reset and kept parameters (millions) and tensors per strategy, SD1.5.
TABLE = {
    "donotforget": (0.0, 587.6426, 0, 518),
    "encoderkv": (233.1898, 354.4528, 164, 354),
    "noencoder": (239.0880, 348.5546, 172, 346),
    "encoderattn": (208.6061, 379.0365, 132, 386),
    "encoderattn+encoder1": (178.6714, 408.9712, 76, 442),
    "decoderkv": (338.2326, 249.4099, 328, 190),
    "decoderattn": (299.5120, 288.1306, 256, 262),
    "decoderattn+decoder2": (238.4246, 349.2179, 170, 348),
}
# SD2.1 (families notes §2.1: 518 tensors, 593.0 M trained; encoderkv 164 / 233.2 M, encoderattn 132 / 208.6 M,
# decoderattn 256 / 299.5 M reset): the same names; 1024-wide attn2.to_k/to_v and Linear proj_in/proj_out.
TABLE_SD21 = {
    "donotforget": (0.0, 593.0493, 0, 518),
    "encoderkv": (233.1898, 359.8595, 164, 354),
    "noencoder": (241.0541, 351.9952, 172, 346),
    "encoderattn": (208.6061, 384.4432, 132, 386),
    "encoderattn+encoder1": (178.6714, 414.3779, 76, 442),
    "decoderkv": (338.2326, 254.8166, 328, 190),
    "decoderattn": (299.5120, 293.5373, 256, 262),
    "decoderattn+decoder2": (238.4246, 354.6246, 170, 348),
}
TOPOLOGIES = {"SD1.5": (TABLE, 859.5210, 587.6426), "SD2.1": (TABLE_SD21, 865.9107, 593.0493)}


def unet_config(topology: str) -> dict:
    """ComfyUI's detected config of the real checkpoint (SD2.1 with its 64-channel heads)."""
    import comfy.supported_models
    from tiny_models import sd2_unet_config, sd15_unet_config

    if topology == "SD1.5":
        return comfy.supported_models.SD15(sd15_unet_config(320, 768)).unet_config
    return comfy.supported_models.SD20(sd2_unet_config(320, 1024)).unet_config


@pytest.fixture(scope="module", params=TOPOLOGIES)
def topology(comfy, request):
    """(name, {key: numel}) of the full UNet built on the meta device."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**unet_config(request.param), device="meta", operations=comfy.ops.disable_weight_init)
    return request.param, {k: v.numel() for k, v in unet.state_dict().items()}


def test_trained_set_is_518_tensors(topology):
    name, shapes = topology
    _, total, trained_params = TOPOLOGIES[name]
    assert len(shapes) == 686 and round(sum(shapes.values()) / 1e6, 4) == total
    trained = {k: n for k, n in shapes.items() if is_trained(k)}
    assert len(trained) == 518 and round(sum(trained.values()) / 1e6, 4) == trained_params


@pytest.mark.parametrize("strategy", TABLE)
def test_strategy_counts_match_the_spec(topology, strategy):
    name, shapes = topology
    rule = forget_rule(strategy)
    trained = {k: n for k, n in shapes.items() if is_trained(k)}
    reset = {k: n for k, n in trained.items() if rule(k)}
    kept = {k: n for k, n in trained.items() if not rule(k)}
    got = (round(sum(reset.values()) / 1e6, 4), round(sum(kept.values()) / 1e6, 4), len(reset), len(kept))
    assert got == TOPOLOGIES[name][0][strategy]
    assert not any(rule(k) for k in shapes if not is_trained(k))


def test_encoderkv_keeps_exactly_the_encoder_cross_attention_kv(topology):
    _, shapes = topology
    rule = forget_rule("encoderkv")
    kept_encoder = sorted(k for k in shapes if is_trained(k) and k.startswith("input_blocks.") and not rule(k))
    assert kept_encoder == sorted(f"input_blocks.{b}.1.transformer_blocks.0.attn2.{p}.weight"
                                  for b in (4, 5, 7, 8) for p in ("to_k", "to_v"))


def test_all_strategies_are_tabled():
    assert set(STRATEGIES) == set(TABLE) == set(TABLE_SD21)


@pytest.mark.parametrize("degree", [0.0, 0.25, 1.0])
def test_forget_degree_interpolates_exactly(comfy, tiny, finetuned, degree):
    import comfy.model_management

    model = tiny["model"]
    rule = forget_rule("decoderattn")
    edited, = run_node("ForgeditForget", model=model, result=finetuned, strategy="decoderattn", degree=degree)
    comfy.model_management.load_models_gpu([edited], force_full_load=True)
    merged = {k: v.clone() for k, v in edited.model.diffusion_model.state_dict().items()}
    comfy.model_management.unload_all_models()
    base = model.model.diffusion_model.state_dict()
    for key, delta in finetuned.deltas.items():
        c = degree if rule(key) else 1.0
        assert torch.equal(merged[key], base[key] + c * delta) if c else torch.equal(merged[key], base[key])
        learned = base[key] + delta
        assert torch.allclose(merged[key], c * learned + (1 - c) * base[key], atol=1e-6)
    assert all(torch.equal(merged[k], base[k]) for k in base if k not in finetuned.deltas)


# Forgedit §7: the DreamBooth+Forgedit pipeline's rules on diffusers names (everything trained).
DREAMBOOTH_REFERENCE = {
    "dreambooth: noencoder": lambda n: "down_blocks" in n,
    "dreambooth: nodecoder": lambda n: "up_blocks" in n,
    "dreambooth: encoderattn": lambda n: "down_blocks" in n and "attn" not in n,
    "dreambooth: encoderattn+encoder1": lambda n: "down_blocks" in n and "attn" not in n and "down_blocks.1" not in n,
    "dreambooth: decoderattn": lambda n: "up_blocks" in n and "attn" not in n,
    "dreambooth: encoderkv only": lambda n: "down_blocks" in n and ("attn2.to_k" in n or "attn2.to_v" in n),
}


@pytest.mark.parametrize("strategy", DREAMBOOTH_REFERENCE)
def test_dreambooth_strategies_match_the_references_rules(topology, strategy):
    import comfy.utils
    from forgedit_ops.forgetting import DREAMBOOTH_STRATEGIES

    name, shapes = topology
    to_ldm = {n: k for n, k in comfy.utils.unet_to_diffusers(unet_config(name)).items() if k in shapes}
    assert len(to_ldm) == len(shapes) == 686 and set(DREAMBOOTH_STRATEGIES) == set(DREAMBOOTH_REFERENCE)
    expected = {to_ldm[n] for n in to_ldm if DREAMBOOTH_REFERENCE[strategy](n)}
    assert expected and {k for k in shapes if forget_rule(strategy)(k)} == expected
