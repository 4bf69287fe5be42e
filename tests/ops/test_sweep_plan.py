"""The sweep plan and the γ / α / seed lists on plain values (forgedit_ops only, no ComfyUI)."""
import pytest
from forgedit_ops.interpolation import MAX_SEED, parse_seeds, parse_values
from forgedit_ops.sweep import Cell, interpolation_columns, plan_sweep, read_columns, read_sweep


def test_vp_plan_rows_are_seeds_columns_alpha_major_settings():
    plan = plan_sweep("vp", [1.0, 1.2], [0.7, 0.9], [3, 4])
    assert plan.columns == [(0.7, 1.0), (0.7, 1.2), (0.9, 1.0), (0.9, 1.2)]
    assert plan.seeds == [3, 4] and plan.row_labels == ["seed 3", "seed 4"]
    assert plan.col_labels == ["beta 1\nalpha 0.7", "beta 1.2\nalpha 0.7", "beta 1\nalpha 0.9", "beta 1.2\nalpha 0.9"]
    assert plan.cells[:5] == [Cell(0.7, 1.0, 3, 0, 0), Cell(0.7, 1.2, 3, 0, 1), Cell(0.9, 1.0, 3, 0, 2),
                              Cell(0.9, 1.2, 3, 0, 3), Cell(0.7, 1.0, 4, 1, 0)]
    assert len(plan.cells) == 8 and plan.cells[-1] == Cell(0.9, 1.2, 4, 1, 3)


def test_vs_plan_has_no_alpha():
    plan = plan_sweep("vs", [0.5, 0.6], [0.7, 0.9], [0])
    assert plan.columns == [(None, 0.5), (None, 0.6)] and plan.col_labels == ["gamma 0.5", "gamma 0.6"]
    assert [(c.alpha, c.gamma, c.seed, c.row, c.col) for c in plan.cells] == [(None, 0.5, 0, 0, 0), (None, 0.6, 0, 0, 1)]


def test_interpolate_rows_are_the_sampler_columns():
    assert read_columns("vp", "1.0, 1.2", "0.7:0.9:0.2") == plan_sweep("vp", [1.0, 1.2], [0.7, 0.9], [0]).columns
    assert read_columns("vs", "0.5:0.7:0.1", "not read in vs") == [(None, 0.5), (None, 0.6), (None, 0.7)]


@pytest.mark.parametrize("mode, gammas, alphas, seeds, message", [
    ("vs", [0.1] * 300, [], list(range(4)), r"gammas x seeds = 300 x 4 = 1200 images; at most 1024"),
    ("vp", [0.1] * 16, [0.7] * 8, list(range(9)), r"alphas x gammas x seeds = 8 x 16 x 9 = 1152 images; at most 1024"),
    ("vp", [0.1] * 256, [0.7] * 5, [0], r"alphas x gammas = 5 x 256 = 1280 settings; at most 1024"),
])
def test_plan_caps_the_number_of_images(mode, gammas, alphas, seeds, message):
    with pytest.raises(ValueError, match=message):
        plan_sweep(mode, gammas, alphas, seeds)


def test_cap_counts_cells_exactly():
    assert len(plan_sweep("vs", [0.1] * 256, [], list(range(4))).cells) == 1024
    with pytest.raises(ValueError, match="settings; at most 2"):
        interpolation_columns("vp", [1.0, 1.2], [0.7, 0.9], cap=2)


def test_read_sweep_checks_the_mode_first_and_alphas_only_in_vp():
    with pytest.raises(ValueError, match="mode must be 'vs' or 'vp', got 'xx'"):
        read_sweep("xx", "bad", "bad", "bad")
    assert read_sweep("vs", "0.5", "0.7,,", "1").columns == [(None, 0.5)]
    with pytest.raises(ValueError, match="alphas: item 2 of '0.7,,' is empty"):
        read_sweep("vp", "0.5", "0.7,,", "1")
    assert read_sweep("vp", "1.0", "0.7, 0.9", "7:9:1").seeds == [7, 8, 9]


@pytest.mark.parametrize("text, message", [
    ("0.5,,0.7", r"gammas: item 2 of '0.5,,0.7' is empty"),
    ("0.5, 0.6,", r"gammas: item 3 of '0.5, 0.6,' is empty"),
    (", 0.5", r"gammas: item 1 of ', 0.5' is empty"),
    ("0.7:0.5:0.1", r"cannot read the range '0.7:0.5:0.1'"),
    ("0.5:0.7", r"cannot read the range '0.5:0.7'"),
    ("inf", r"finite"),
    ("0:100000000:0.000001", r"gammas has 100000000000001 values; at most 256"),
])
def test_gamma_list_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_values(text, "gammas")


def test_each_list_quotes_its_own_example():
    with pytest.raises(ValueError, match=r"'0.5, 0.6, 0.7' or a range 'start:stop:step' such as '0.5:0.7:0.1'"):
        read_sweep("vs", "x", "0.7", "0")
    with pytest.raises(ValueError, match=r"alphas: cannot read 'x'; write e.g. '0.7, 0.9' .* '0.7:0.9:0.1'"):
        read_sweep("vp", "1", "x", "0")
    with pytest.raises(ValueError, match=r"seeds: cannot read 'x'; write e.g. '0, 1, 2, 3' .* '0:3:1'") as e:
        parse_seeds("0, x")
    assert "0.5" not in str(e.value)


@pytest.mark.parametrize("text, seeds", [
    ("0, 1, 2, 3", [0, 1, 2, 3]), ("7", [7]), ("0:6:2", [0, 2, 4, 6]), ("5 ; 1:2:1", [5, 1, 2]),
    (str(MAX_SEED), [MAX_SEED]), (f"{MAX_SEED - 1}:{MAX_SEED}:1", [MAX_SEED - 1, MAX_SEED]),
])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text, message", [
    ("1.5", r"seeds: '1.5' is not a seed; seeds are whole numbers from 0 to 18446744073709551615"),
    ("0, 2.0", r"'2.0' is not a seed"),
    ("-1", r"'-1' is not a seed"),
    ("1e3", r"'1e3' is not a seed"),
    (str(MAX_SEED + 1), r"'18446744073709551616' is not a seed"),
    ("0:1.5:1", r"'1.5' is not a seed"),
    ("3:1:1", r"cannot read the range '3:1:1'"),
    ("0:3:0", r"cannot read the range '0:3:0'"),
    ("0,,1", r"seeds: item 2 of '0,,1' is empty"),
    (" ", r"seeds is empty"),
    (f"0:{MAX_SEED}:1", r"seeds has 18446744073709551616 values; at most 256"),
])
def test_seed_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_seeds(text)
