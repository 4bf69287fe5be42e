"""The edit sweep: which (α, γ, seed) cells Forgedit Sampler samples, in which order, on which labelled grid, and the
(α, γ) settings Forgedit Interpolate turns into conditioning rows (Forgedit §4, §6)."""
from dataclasses import dataclass

from .interpolation import ALPHA_EXAMPLE, parse_seeds, parse_values

MODES = ("vs", "vp")
MAX_IMAGES = 1024


@dataclass(frozen=True)
class Cell:
    """One image of the sweep: its interpolation (α is None in vs), its seed and its place on the grid."""
    alpha: float | None
    gamma: float
    seed: int
    row: int
    col: int


@dataclass(frozen=True)
class SweepPlan:
    """Grid rows are the seeds, grid columns the (α, γ) settings; `cells` is row-major, the order of the output batch."""
    columns: list[tuple[float | None, float]]
    seeds: list[int]
    col_labels: list[str]
    row_labels: list[str]

    @property
    def cells(self) -> list[Cell]:
        return [Cell(a, g, s, r, c) for r, s in enumerate(self.seeds) for c, (a, g) in enumerate(self.columns)]


def require_mode(mode: str) -> None:
    """§4's two interpolations: vs (vector subtraction) and vp (vector projection)."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'vs' or 'vp', got {mode!r}")


def interpolation_columns(mode: str, gammas: list[float], alphas: list[float],
                          cap: int = MAX_IMAGES) -> list[tuple[float | None, float]]:
    """§4 settings, one conditioning row each: vp every α × every γ (α-major, γ as β), vs every γ (no α)."""
    require_mode(mode)
    if mode == "vs":
        return [(None, g) for g in gammas]
    if len(alphas) * len(gammas) > cap:
        raise ValueError(f"alphas x gammas = {len(alphas)} x {len(gammas)} = {len(alphas) * len(gammas)} settings; at "
                         f"most {cap} are allowed: shorten alphas or gammas")
    return [(a, g) for a in alphas for g in gammas]


def column_label(alpha: float | None, gamma: float) -> str:
    """A grid column's heading: γ in vs; β (= γ) and α in vp (§4)."""
    return f"gamma {gamma:g}" if alpha is None else f"beta {gamma:g}\nalpha {alpha:g}"


def plan_sweep(mode: str, gammas: list[float], alphas: list[float], seeds: list[int], cap: int = MAX_IMAGES) -> SweepPlan:
    """§6 sweep: every (α, γ) setting for every seed, at most `cap` images in all."""
    columns = interpolation_columns(mode, gammas, alphas, cap)
    if len(columns) * len(seeds) > cap:
        sizes = (f"gammas x seeds = {len(gammas)} x {len(seeds)}" if mode == "vs"
                 else f"alphas x gammas x seeds = {len(alphas)} x {len(gammas)} x {len(seeds)}")
        raise ValueError(f"{sizes} = {len(columns) * len(seeds)} images; at most {cap} are allowed in one sweep: shorten "
                         f"{'gammas' if mode == 'vs' else 'alphas, gammas'} or seeds, or split the sweep over two nodes")
    return SweepPlan(columns, list(seeds), [column_label(a, g) for a, g in columns], [f"seed {s}" for s in seeds])


def _read_lists(mode: str, gammas: str, alphas: str) -> tuple[list[float], list[float]]:
    require_mode(mode)
    return parse_values(gammas, "gammas"), (parse_values(alphas, "alphas", ALPHA_EXAMPLE) if mode == "vp" else [])


def read_columns(mode: str, gammas: str, alphas: str) -> list[tuple[float | None, float]]:
    """Forgedit Interpolate's text inputs as settings; alphas is read in vp only."""
    return interpolation_columns(mode, *_read_lists(mode, gammas, alphas))


def read_sweep(mode: str, gammas: str, alphas: str, seeds: str) -> SweepPlan:
    """Forgedit Sampler's text inputs as a plan; alphas is read in vp only."""
    return plan_sweep(mode, *_read_lists(mode, gammas, alphas), parse_seeds(seeds))
