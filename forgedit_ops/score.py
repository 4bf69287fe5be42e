"""Forgedit Score: the edit strength suggested from a sweep by a documented rule over text alignment T and fidelity F
(design: shared/docs/metrics-families-runner.md §1.4), and the metric math on features (CLIP score, image similarity,
CLIP direction, SSIM). Plain torch; never imports ComfyUI.

The rules (every one deterministic; ties go to the smaller γ; the axis γ is assumed to raise the edit strength):
- `threshold` (default, parameter τ = 0.8): with T̂(γ) = (T(γ) − T(γ_min)) / (max T − T(γ_min)), the smallest γ with
  T̂ ≥ τ: "the edit has mostly happened". If the rise max T − T(γ_min) is not above `min_rise` (in T's own unit; 0:
  only a curve that never rises above its first value), the flag "no edit detected" is set and the largest γ returned.
- `knee` (no parameter): Kneedle on the (F, T) curve, both min-max normalised over the γ of the curve: the γ whose point
  lies farthest on the (high F, high T) side of the chord from the γ_min point to the γ_max point. If no point lies
  strictly on that side the flag "no knee" is set and γ_min returned. A flat F (max F = min F) is replaced by the
  normalised decreasing γ, i.e. Kneedle on T(γ) alone.
- `min fidelity` (parameter m, CLIP image similarity, e.g. 0.85): the γ with the largest T among those with F ≥ m; if
  none reaches m the flag "no candidate reaches the minimum fidelity" is set and the γ with the largest F returned.

Before a rule runs, cells whose T or F is not finite are dropped, and the seeds of each (α, γ) setting are averaged
(mean; spread = population standard deviation). Input order does not matter (settings are sorted by γ). The picks are
invariant to T ↦ aT + b and F ↦ cF + d with a, c > 0 (scale `min_rise` by a and `min_fidelity` as F).

vp mode: the rule picks β (the `gamma` axis) for each α; then the same rule runs over those per-α picks, with α
ordered from the largest (closest to the source) to the smallest, ties to the larger α.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

RULES = ("threshold", "knee", "min fidelity")
NO_EDIT = "no edit detected"
NO_KNEE = "no knee"
NO_FIDELITY = "no candidate reaches the minimum fidelity"
TOLERANCE = 1e-9  # relative slack in the comparisons, so that an affine rescaling cannot flip an exact tie


@dataclass(frozen=True)
class SweepData:
    """What Forgedit Sampler's `sweep` output carries: every cell's image, in the batch order of `images`."""
    images: torch.Tensor  # (N, H, W, 3) in [0, 1]
    gammas: list  # γ (vs) or β (vp) per cell
    alphas: list  # α per cell (None in vs)
    seeds: list  # seed per cell
    mode: str


@dataclass(frozen=True)
class Curve:
    """One α's settings, sorted by γ: seed means and spreads of T and F, and the cells each setting averages."""
    alpha: float | None
    gammas: list[float]
    t: list[float]
    f: list[float]
    t_spread: list[float]
    f_spread: list[float]
    cells: list[list[int]]


@dataclass(frozen=True)
class Choice:
    """The pick: its γ and α, the cells (seeds) it averages, the flag (None when the rule found its point)."""
    gamma: float
    alpha: float | None
    flag: str | None
    rule: str
    curves: list[Curve] = field(repr=False)
    curve: int = 0  # index into curves
    index: int = 0  # index into that curve's gammas

    @property
    def cells(self) -> list[int]:
        return self.curves[self.curve].cells[self.index]


def _finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


def _mean_spread(values: list[float]) -> tuple[float, float]:
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std(unbiased=False))


def summarize(gammas, t, f, alphas=None) -> list[Curve]:
    """Cells → one curve per α (sorted, None first), each setting the seed mean and spread; non-finite cells dropped."""
    n = len(gammas)
    alphas = [None] * n if alphas is None else list(alphas)
    if not (len(t) == len(f) == len(alphas) == n):
        raise ValueError(f"gammas, t, f and alphas differ in length ({n}, {len(t)}, {len(f)}, {len(alphas)})")
    groups: dict = {}
    for i in range(n):
        if _finite(t[i]) and _finite(f[i]) and _finite(gammas[i]):
            a = None if alphas[i] is None else float(alphas[i])
            groups.setdefault(a, {}).setdefault(float(gammas[i]), []).append(i)
    if not groups:
        raise ValueError("no cell of the sweep has a finite alignment and fidelity")
    curves = []
    for a in sorted(groups, key=lambda a: (a is not None, a or 0.0)):
        settings = sorted(groups[a].items())
        stats = [(_mean_spread([float(t[i]) for i in idx]), _mean_spread([float(f[i]) for i in idx]))
                 for _, idx in settings]
        curves.append(Curve(a, [g for g, _ in settings], [s[0][0] for s in stats], [s[1][0] for s in stats],
                            [s[0][1] for s in stats], [s[1][1] for s in stats], [idx for _, idx in settings]))
    return curves


def _slack(values) -> float:
    return TOLERANCE * max(1.0, max(abs(v) for v in values))


def pick_threshold(t: list[float], tau: float = 0.8, min_rise: float = 0.0) -> tuple[int, str | None]:
    """Index of the smallest γ with T̂ ≥ τ (T sorted by γ), or (last, NO_EDIT) when T never rises above min_rise."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"threshold tau must be between 0 and 1, got {tau}")
    rise = max(t) - t[0]
    if rise <= max(min_rise, 0.0) + _slack(t):
        return len(t) - 1, NO_EDIT
    for i, v in enumerate(t):
        if (v - t[0]) / rise >= tau - TOLERANCE:
            return i, None
    return len(t) - 1, None  # unreachable: the maximum has T̂ = 1


def _normalised(values: list[float]) -> list[float] | None:
    lo, hi = min(values), max(values)
    if hi - lo <= _slack(values):
        return None
    return [(v - lo) / (hi - lo) for v in values]


def pick_knee(t: list[float], f: list[float]) -> tuple[int, str | None]:
    """Index of the Kneedle point of the (F, T) curve (sorted by γ): farthest on the high-F, high-T side of the chord."""
    n = len(t)
    if n < 3:
        return 0, NO_KNEE if n == 2 else None
    y = _normalised(t)
    if y is None:
        return 0, NO_KNEE
    x = _normalised(f) or [1.0 - i / (n - 1) for i in range(n)]
    (x0, y0), (x1, y1) = (x[0], y[0]), (x[-1], y[-1])
    dx, dy = x1 - x0, y1 - y0
    norm = math.hypot(dx, dy)
    if norm == 0.0:
        return 0, NO_KNEE
    # the normal of the chord that points to (1, 1), the corner of high fidelity and high alignment
    nx, ny = -dy / norm, dx / norm
    if nx * (1 - x0) + ny * (1 - y0) < 0:
        nx, ny = -nx, -ny
    distance = [nx * (x[i] - x0) + ny * (y[i] - y0) for i in range(n)]
    top = max(distance)
    if top <= TOLERANCE:
        return 0, NO_KNEE
    return min(i for i in range(n) if distance[i] >= top - TOLERANCE), None


def pick_min_fidelity(t: list[float], f: list[float], min_fidelity: float) -> tuple[int, str | None]:
    """Index of the largest T among F ≥ min_fidelity (ties: smaller γ), or (largest F, NO_FIDELITY) if none reaches it."""
    ok = [i for i in range(len(t)) if f[i] >= min_fidelity - _slack(f)]
    if not ok:
        return max(range(len(f)), key=lambda i: (f[i], -i)), NO_FIDELITY
    top = max(t[i] for i in ok)
    return min(i for i in ok if t[i] >= top - _slack(t)), None


def apply_rule(rule: str, t: list[float], f: list[float], parameter: float, min_rise: float = 0.0):
    if rule == "threshold":
        return pick_threshold(t, parameter, min_rise)
    if rule == "knee":
        return pick_knee(t, f)
    if rule == "min fidelity":
        return pick_min_fidelity(t, f, parameter)
    raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")


def choose(rule: str, gammas, t, f, alphas=None, parameter: float = 0.8, min_rise: float = 0.0) -> Choice:
    """The rule's pick over a sweep's cells (T, F per cell; seeds averaged); vp: β per α, then α (module docstring)."""
    curves = summarize(gammas, t, f, alphas)
    picks = [apply_rule(rule, c.t, c.f, parameter, min_rise) for c in curves]
    if len(curves) == 1:
        (i, flag), = picks
        return Choice(curves[0].gammas[i], curves[0].alpha, flag, rule, curves, 0, i)
    # α from the largest (weakest edit) to the smallest; the per-α picks form the curve the rule runs over again
    order = sorted(range(len(curves)), key=lambda k: -(curves[k].alpha or 0.0))
    t_a = [curves[k].t[picks[k][0]] for k in order]
    f_a = [curves[k].f[picks[k][0]] for k in order]
    j, flag_a = apply_rule(rule, t_a, f_a, parameter, min_rise)
    k = order[j]
    i, flag = picks[k]
    flags = [s for s in (flag, flag_a and f"{flag_a} across alphas") if s]
    return Choice(curves[k].gammas[i], curves[k].alpha, "; ".join(flags) or None, rule, curves, k, i)


# --- metric math on features and pixels ---

def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (N, D) and (N or 1, D) features, in float64."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP score as torchmetrics' CLIPScore: 100 · max(cos(image, text), 0)."""
    return 100.0 * cosine(image_features, text_features).clamp(min=0)


def image_similarity(image_features: torch.Tensor, source_features: torch.Tensor) -> torch.Tensor:
    """CLIP-I: cosine similarity of each image's feature to the source photo's."""
    return cosine(image_features, source_features)


def clip_direction(image_features, source_image_features, text_features, source_text_features) -> torch.Tensor:
    """CLIP directional similarity: cos(E_I(edit) − E_I(source), E_T(target) − E_T(source caption)); 0 where the image
    did not move."""
    d_image = image_features.double() - source_image_features.double()
    d_text = text_features.double() - source_text_features.double()
    return F.cosine_similarity(d_image, d_text.expand_as(d_image), dim=-1, eps=1e-12)


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(images: torch.Tensor, reference: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004: 11×11 Gaussian window σ 1.5, K1 0.01, K2 0.03, range 1, valid windows, per channel)
    of (N, H, W, C) images in [0, 1] against a (1 or N, H, W, C) reference of the same size; one value per image."""
    x = images.movedim(-1, 1).double()
    y = reference.movedim(-1, 1).double().expand_as(x)
    size = min(size, x.shape[-1], x.shape[-2])
    g = _gaussian(size, sigma)
    c = x.shape[1]
    window = (g[:, None] * g[None, :]).expand(c, 1, size, size)

    def blur(z):
        return F.conv2d(z, window, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))
