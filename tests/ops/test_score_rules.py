"""Forgedit Score's rules on synthetic curves (design §1.5.1): the known γ of each rule on a sigmoid alignment with a
linear fidelity, the "no edit" flag, ties, noisy and unsorted input, NaNs, vp, and invariance to affine rescaling."""
import math
import random

import pytest
import torch
from forgedit_ops.score import (NO_EDIT, NO_FIDELITY, NO_KNEE, RULES, choose, clip_direction, clip_score,
                                image_similarity, pick_knee, pick_min_fidelity, pick_threshold, ssim, summarize)

GAMMAS = [round(0.3 + 0.01 * k, 2) for k in range(61)]  # 0.3 … 0.9
CENTRE, WIDTH = 0.6, 0.05


def sigmoid(g):
    return 1 / (1 + math.exp(-(g - CENTRE) / WIDTH))


def alignment(g):
    return sigmoid(g)


def fidelity(g):
    return 1 - 0.3 * g


def logit(p):
    return math.log(p / (1 - p))


def curve(gammas=GAMMAS):
    return list(gammas), [alignment(g) for g in gammas], [fidelity(g) for g in gammas]


@pytest.mark.parametrize("tau", [0.5, 0.8, 0.95])
def test_threshold_is_the_first_gamma_past_tau_of_the_rise(tau):
    s0, s1 = sigmoid(GAMMAS[0]), sigmoid(GAMMAS[-1])
    exact = CENTRE + WIDTH * logit(s0 + tau * (s1 - s0))  # where T̂ = τ on the continuous curve
    expected = min(g for g in GAMMAS if g >= exact - 1e-12)
    choice = choose("threshold", *curve(), parameter=tau)
    assert choice.gamma == expected and choice.flag is None and choice.alpha is None
    assert GAMMAS[GAMMAS.index(expected) - 1] < exact


def test_knee_of_sigmoid_against_linear_fidelity():
    """F linear in γ: the distance to the chord is T̂ − γ̂, largest where σ(1 − σ)/w = (σ1 − σ0)/(γ1 − γ0), σ > 1/2."""
    s0, s1 = sigmoid(GAMMAS[0]), sigmoid(GAMMAS[-1])
    k = WIDTH * (s1 - s0) / (GAMMAS[-1] - GAMMAS[0])
    s = (1 + math.sqrt(1 - 4 * k)) / 2
    exact = CENTRE + WIDTH * logit(s)
    choice = choose("knee", *curve())
    assert abs(choice.gamma - exact) <= 0.01 and choice.flag is None


def test_min_fidelity_is_the_best_alignment_that_keeps_fidelity():
    """F = 1 − 0.3γ ≥ 0.76 up to γ = 0.8 (0.3 · 0.8 is not exact in floating point: the rule's slack keeps it)."""
    choice = choose("min fidelity", *curve(), parameter=0.76)
    assert choice.gamma == 0.8 and choice.flag is None
    none = choose("min fidelity", *curve(), parameter=0.99)
    assert none.gamma == GAMMAS[0] and none.flag == NO_FIDELITY


@pytest.mark.parametrize("t", [[0.3] * 5, [0.5, 0.4, 0.3, 0.2, 0.1]])
def test_no_rise_is_flagged_and_gives_the_largest_gamma(t):
    gammas = [0.1, 0.2, 0.3, 0.4, 0.5]
    choice = choose("threshold", gammas, t, [1.0] * 5)
    assert choice.gamma == 0.5 and choice.flag == NO_EDIT
    assert pick_threshold([1.0, 1.2], 0.8, min_rise=0.5) == (1, NO_EDIT)
    assert pick_threshold([1.0, 1.6], 0.8, min_rise=0.5) == (1, None)
    assert pick_knee(t, [1.0] * 5) == (0, NO_KNEE)


def test_ties_go_to_the_smaller_gamma():
    t, f = [0.0, 1.0, 2.0, 2.0, 2.0], [1.0] * 5
    assert pick_min_fidelity(t, f, 0.5) == (2, None)
    assert pick_threshold(t, 1.0) == (2, None)
    assert pick_knee([0.0, 1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 0.5, 0.5, 0.0]) == (1, None)


def test_single_gamma():
    for rule in RULES:
        choice = choose(rule, [0.7, 0.7], [25.0, 26.0], [0.9, 0.8], parameter=0.8)
        assert choice.gamma == 0.7 and choice.cells == [0, 1]
    assert choose("threshold", [0.7], [25.0], [0.9]).flag == NO_EDIT


def noisy_cells(seeds=4, noise=0.02, rng_seed=0):
    rng = random.Random(rng_seed)
    cells = [(g, s, alignment(g) + rng.gauss(0, noise), fidelity(g) + rng.gauss(0, noise))
             for s in range(seeds) for g in GAMMAS[::5]]
    return cells


@pytest.mark.parametrize("rule, parameter", [("threshold", 0.8), ("knee", 0.0), ("min fidelity", 0.8)])
def test_noisy_unsorted_input_gives_one_pick(rule, parameter):
    cells = noisy_cells()
    picks = set()
    for order in range(5):
        shuffled = cells[:]
        random.Random(order).shuffle(shuffled)
        g, _, t, f = zip(*shuffled)
        c = choose(rule, g, t, f, parameter=parameter)
        picks.add((c.gamma, c.flag, tuple(sorted(shuffled[i][1] for i in c.cells))))
    assert len(picks) == 1 and next(iter(picks))[2] == (0, 1, 2, 3)


def test_seeds_are_averaged_with_their_spread_and_nan_cells_dropped():
    curves = summarize([0.5, 0.6, 0.5, 0.6, 0.5], [1.0, 2.0, 3.0, 4.0, float("nan")], [0.9, 0.8, 0.7, 0.6, 0.5])
    c, = curves
    assert c.gammas == [0.5, 0.6] and c.t == [2.0, 3.0] and c.t_spread == [1.0, 1.0]
    assert c.f == pytest.approx([0.8, 0.7]) and c.cells == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="no cell"):
        summarize([0.5], [float("nan")], [1.0])


@pytest.mark.parametrize("rule, parameter", [("threshold", 0.8), ("knee", 0.0), ("min fidelity", 0.76)])
@pytest.mark.parametrize("a, b, c, d", [(100.0, -3.0, 1.0, 0.0), (0.37, 12.5, 7.0, -2.0), (1e-3, 1e3, 1e-2, 5.0)])
def test_affine_rescaling_leaves_the_pick(rule, parameter, a, b, c, d):
    g, t, f = curve()
    base = choose(rule, g, t, f, parameter=parameter)
    scaled = choose(rule, g, [a * v + b for v in t], [c * v + d for v in f],
                    parameter=c * parameter + d if rule == "min fidelity" else parameter)
    assert (scaled.gamma, scaled.flag) == (base.gamma, base.flag)
    g, _, t, f = zip(*noisy_cells())
    base = choose(rule, g, t, f, parameter=parameter)
    scaled = choose(rule, g, [a * v + b for v in t], [c * v + d for v in f],
                    parameter=c * parameter + d if rule == "min fidelity" else parameter)
    assert (scaled.gamma, scaled.flag) == (base.gamma, base.flag)


def test_vp_picks_beta_per_alpha_then_alpha():
    """α 0.9 edits weakly (T rises to 0.5), α 0.7 fully (to 1.0); threshold over α (largest first) then wants the
    first α whose pick reaches 80 % of the rise from α 0.9's."""
    betas = [1.0, 1.1, 1.2, 1.3]
    cells = []
    for a, top in ((0.9, 0.5), (0.7, 1.0), (0.5, 1.05)):
        cells += [(b, a, top * k / 3, 1 - 0.1 * k - (0.9 - a)) for k, b in enumerate(betas)]
    g, al, t, f = zip(*cells)
    choice = choose("threshold", g, t, f, alphas=al, parameter=0.8)
    assert [c.alpha for c in choice.curves] == [0.5, 0.7, 0.9]
    # per α the first β with T̂ ≥ 0.8 is 1.3 (T̂ = 0, 1/3, 2/3, 1); over α: T 0.5, 1.0, 1.05 → α 0.7
    assert (choice.alpha, choice.gamma, choice.flag) == (0.7, 1.3, None)
    assert choice.cells == [7]


def test_metric_math():
    torch.manual_seed(0)
    image, text = torch.randn(3, 8), torch.randn(1, 8)
    assert torch.allclose(clip_score(text.expand(2, 8), text), torch.full((2,), 100.0, dtype=torch.float64))
    assert clip_score(-text, text).item() == 0.0
    assert torch.allclose(image_similarity(image, image[:1])[0], torch.tensor(1.0, dtype=torch.float64))
    src_text = torch.randn(1, 8)
    moved = image[:1] + 2 * (text - src_text)
    assert clip_direction(moved, image[:1], text, src_text).item() == pytest.approx(1.0)
    photo = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    values = ssim(torch.cat([photo, 0.5 * photo, torch.rand_like(photo)]), photo)
    assert values[0].item() == pytest.approx(1.0) and 0 < values[2] < values[1] < 1
