"""forgedit_ops on plain tensors: interpolation, value lists, schedule, training helpers (no ComfyUI)."""
import math

import pytest
import torch
from forgedit_ops.finetune import FinetuneConfig, draw_noise_and_timesteps, q_sample
from forgedit_ops.optim import Moment, TensorAdam
from forgedit_ops.forgetting import forget_rule, forgetting_patches
from forgedit_ops.interpolation import interpolate, parse_values, vector_projection, vector_subtraction
from forgedit_ops.result import fingerprint
from forgedit_ops.schedule import ddim_final_scale, ddim_noise_scale, leading_timesteps


def test_vector_subtraction_by_hand():
    e_s = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]])
    e_t = torch.tensor([[[3.0, 0.0], [2.0, 1.0]]])
    out = vector_subtraction(e_s, e_t, [0.0, 0.5, 1.5])
    assert torch.equal(out[0], e_s[0])
    assert torch.equal(out[1], torch.tensor([[2.0, 1.0], [1.0, 0.0]]))
    assert torch.equal(out[2], torch.tensor([[4.0, -1.0], [3.0, 2.0]]))


def test_vector_projection_by_hand():
    e_s = torch.tensor([[[3.0, 0.0], [0.0, 2.0]]])
    e_t = torch.tensor([[[1.0, 1.0], [4.0, 5.0]]])
    out = vector_projection(e_s, e_t, alphas=[0.5], betas=[2.0])
    # token 0: û = (1, 0), e_t ⟂ û = (0, 1); token 1: û = (0, 1), e_t ⟂ û = (4, 0)
    expected = torch.tensor([[[2 * 0 + 1.5, 2 * 1 + 0.0], [2 * 4 + 0.0, 2 * 0 + 1.0]]])
    assert torch.allclose(out, expected)


def test_vector_projection_alpha1_beta0_is_source():
    e_s, e_t = torch.randn(1, 77, 16), torch.randn(1, 77, 16)
    assert torch.equal(vector_projection(e_s, e_t, [1.0], [0.0]), e_s)


def test_projection_edit_part_is_orthogonal_to_source():
    e_s, e_t = torch.randn(1, 77, 16), torch.randn(1, 77, 16)
    edit = vector_projection(e_s, e_t, [0.0], [1.0])
    assert (edit * e_s).sum(-1).abs().max() < 1e-4


def test_interpolate_pairs_alpha_with_gamma():
    e_s, e_t = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    out = interpolate(e_s, e_t, "vp", [0.5, 1.0], [0.7, 0.9])
    assert torch.allclose(out[1], vector_projection(e_s, e_t, [0.9], [1.0])[0])
    with pytest.raises(ValueError, match="mode"):
        interpolate(e_s, e_t, "xx", [0.5], [0.5])


@pytest.mark.parametrize("text, values", [
    ("0.6", [0.6]), ("0.5, 0.6,0.7", [0.5, 0.6, 0.7]), ("0.5:0.7:0.1", [0.5, 0.6, 0.7]),
    ("1.0; 0.4 : 0.6 : 0.1", [1.0, 0.4, 0.5, 0.6]), ("-0.2 1.6", [-0.2, 1.6]), ("0:1.6:0.1", [i / 10 for i in range(17)]),
])
def test_parse_values(text, values):
    assert parse_values(text, "gamma") == pytest.approx(values)


@pytest.mark.parametrize("text, message", [
    ("", "gamma is empty"), (" , ", "cannot read|empty"), ("0.5, x", "cannot read 'x'"), ("0.7:0.5:0.1", "cannot read"),
    ("0:1:0", "cannot read"), ("nan", "finite"), ("0:1000:0.1", "at most"),
])
def test_parse_values_errors_name_the_input(text, message):
    with pytest.raises(ValueError, match=message):
        parse_values(text, "gamma")


def test_leading_timesteps_match_the_reference():
    assert leading_timesteps(50) == list(range(980, -1, -20))
    assert leading_timesteps(1) == [0]
    with pytest.raises(ValueError):
        leading_timesteps(0)


def test_ddim_noise_and_final_scale():
    assert ddim_noise_scale(13.0431, 14.6146) == pytest.approx(math.sqrt(1 + 13.0431**2) / 13.0431)
    assert ddim_noise_scale(14.6146, 14.6146) == 1.0
    assert ddim_final_scale(0.029167) == pytest.approx(0.99957, abs=1e-5)


def test_q_sample_and_draws_are_seeded():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    n1, t1 = draw_noise_and_timesteps(g1, 10, (4, 8, 8))
    n2, t2 = draw_noise_and_timesteps(g2, 10, (4, 8, 8))
    assert torch.equal(n1, n2) and torch.equal(t1, t2) and t1.min() >= 0 and t1.max() < 1000
    z0, abar = torch.randn(1, 4, 8, 8), torch.rand(10)
    x = q_sample(z0, n1, abar)
    assert torch.allclose(x[3], abar[3].sqrt() * z0[0] + (1 - abar[3]).sqrt() * n1[3])


def test_8bit_moment_keeps_relative_precision_over_five_decades():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-5, 0, 1000)
    m = Moment(x, "fp8")
    assert m.codes.element_size() == 1 and m.scale.numel() == 4 and m.get().eq(0).all()
    m.set(x)
    y, scale = m.get(), m.scale.expand(-1, 256).flatten()[:1000] * 448
    assert ((y - x).abs() <= 2**-4 * x.abs() + 1e-3 * scale).all() and (y.abs() <= 2 * x.abs()).all()


@pytest.mark.parametrize("moments, tolerance", [("bf16", 0.01), ("8-bit", 0.1)])
def test_reduced_adam_moments_step_close_to_fp32(moments, tolerance):
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(64, 48, generator=g) * torch.logspace(-4, 0, 48) for _ in range(40)]
    p = {k: torch.zeros(64, 48) for k in ("fp32", moments)}
    adam = {k: TensorAdam(p[k], lr=1e-3, eps=1e-8, moments=k) for k in p}
    for grad in grads:
        for k in p:
            p[k].grad = grad.clone()
            adam[k](p[k])
    assert (p[moments] - p["fp32"]).abs().max() < tolerance * p["fp32"].abs().max()


def test_config_iterations():
    assert FinetuneConfig().iterations == 40
    assert FinetuneConfig(samples=100, batch_size=4).iterations == 25


def test_forgetting_patches_group_by_strength():
    deltas = {"input_blocks.4.0.in_layers.2.weight": 1, "output_blocks.3.0.in_layers.2.weight": 2}
    rule = forget_rule("noencoder")
    assert forgetting_patches(deltas, rule, 0.0) == [({"output_blocks.3.0.in_layers.2.weight": 2}, 1.0)]
    assert forgetting_patches(deltas, rule, 1.0) == [(deltas, 1.0)]
    assert sorted(s for _, s in forgetting_patches(deltas, rule, 0.3)) == [0.3, 1.0]


def test_custom_forget_rule_and_errors():
    rule = forget_rule("custom (regex)", r"input_blocks\.[78]\.")
    assert rule("input_blocks.7.1.proj_in.weight") and not rule("input_blocks.4.1.proj_in.weight")
    with pytest.raises(ValueError, match="forget_pattern is empty"):
        forget_rule("custom (regex)", "")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        forget_rule("custom (regex)", "(")
    with pytest.raises(ValueError, match="unknown forgetting strategy"):
        forget_rule("forgeteverything")


def test_fingerprint_tracks_values_not_precision():
    weights = {"a": torch.randn(64, 32), "b": torch.randn(300)}
    same = fingerprint(weights.items())
    assert fingerprint({k: v.half() for k, v in weights.items()}.items()) == same
    assert fingerprint({k: v.half().float() for k, v in weights.items()}.items()) == same
    changed = dict(weights, b=weights["b"] + 0.5)
    assert fingerprint(changed.items()) != same
