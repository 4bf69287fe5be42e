"""Prompt-to-Prompt's edit arithmetic on plain tensors with a toy vocabulary (no ComfyUI): windows, word positions,
the word-swap mapper with its reference tail bug and the fixed aligner, Needleman–Wunsch refinement, re-weighting and
LocalBlend. The hand-checked cases follow design §1.2 #2-#5 and §8.1."""
import pytest
import torch
from forgedit_ops.p2p import (blend, blend_begins, blend_weights, cross_steps, equalizer, local_blend_mask,
                              parse_reweight, refinement_mapper, replacement_mapper, self_steps, value_steps,
                              word_indices)

# A toy tokenizer: each word is one or more pieces; ids are the pieces' places in the vocabulary; 0 = BOS, 1 = EOS.
PIECES = {"gnochi": ["gno", "chi"], "butterfly": ["butter", "fly"], "cat,": ["cat", ","], "#1": ["#", "1"]}
VOCAB = ["<bos>", "<eos>", "a", "cat", "dog", "tiger", "tent", "in", "forest", "sitting", "red", "gno", "chi", "butter",
         "fly", ",", "#", "1", "on", "the", "mat"]
ID = {piece: k for k, piece in enumerate(VOCAB)}


def encode(text):
    return [ID[p] for word in text.split() for p in PIECES.get(word, [word])]


def decode(token):
    return VOCAB[token]


def ids(text):
    return [0] + encode(text) + [1]


def edited(mapper, p_src):
    """The target map a replacement mapper gives: P_tgt'[..., j] = Σ_i P_src[..., i] · mapper[i, j]."""
    return torch.einsum("hqi,ij->hqj", p_src, mapper)


# --- windows (design §1.2 #2, §8.1 test_windows) ----------------------------------------------------------------------

def test_cross_window_uses_the_reference_t_plus_one_rows():
    assert cross_steps(0.65, 30) == 20 and int(30 * 0.65) == 19
    assert cross_steps(0.8, 30) == 24 and cross_steps(0.5, 30) == 15
    assert cross_steps(0.0, 30) == 0
    assert cross_steps(1.0, 30) == 30  # int(31·1) = 31 rows, capped to the 30 steps there are
    assert cross_steps(0.99, 30) == 30


def test_value_window_is_a_float_comparison():
    assert value_steps(0.55, 30) == 17  # ceil(16.5), not int(16.5)
    assert value_steps(0.5, 30) == 15 and value_steps(0.6, 30) == 18
    assert value_steps(0.0, 30) == 0 and value_steps(1.0, 30) == 30
    assert value_steps(0.14, 50) == 8  # 50·0.14 = 7.000000000000001 in floats: the reference's i < T·τ_v admits i = 7


def test_self_and_uncond_windows_and_blend_start():
    assert self_steps(0.6, 30) == 18 and self_steps(0.55, 30) == 16 and self_steps(0.5, 30) == 15
    assert self_steps(0.0, 30) == 0 and self_steps(1.0, 30) == 30
    assert self_steps(0.58, 50) == 28  # 50·0.58 = 28.999999999999996: int() floors, as the reference does
    assert blend_begins(0.2, 30) == 6 and blend_begins(0.0, 30) == 0 and blend_begins(0.2, 50) == 10


@pytest.mark.parametrize("fn", [cross_steps, value_steps, self_steps, blend_begins])
@pytest.mark.parametrize("tau", [-0.1, 1.5, float("nan")])
def test_windows_reject_fractions_outside_0_1(fn, tau):
    with pytest.raises(ValueError, match="between 0 and 1"):
        fn(tau, 30)


# --- word positions ---------------------------------------------------------------------------------------------------

def test_word_indices_count_bos_and_walk_pieces():
    assert word_indices("a cat", "a", encode, decode) == [1]
    assert word_indices("a cat", "cat", encode, decode) == [2]
    assert word_indices("a gnochi in forest", "gnochi", encode, decode) == [2, 3]
    assert word_indices("a gnochi in forest", "in", encode, decode) == [4]
    assert word_indices("a gnochi in forest", 3, encode, decode) == [5]
    assert word_indices("a cat on a mat", "a", encode, decode) == [1, 4]  # every occurrence
    assert word_indices("a cat, sitting", "cat,", encode, decode) == [2, 3]
    assert word_indices("a cat", "dog", encode, decode) == []
    assert word_indices("a cat", "cat,", encode, decode) == []


def test_word_indices_normalise_whitespace():
    assert word_indices("  a   gnochi in\tforest ", "forest", encode, decode) == [5]


def test_word_indices_strip_hashes_like_the_reference():
    # '#' decodes to '' after strip('#'): the walk then lags, so '1' still counts for '#1' and 'cat' is found late.
    assert word_indices("#1 cat", "#1", encode, decode) == [1, 2, 3]
    assert word_indices("#1 cat", "cat", encode, decode) == []


# --- replacement mapper (design §1.2 #4) ------------------------------------------------------------------------------

@pytest.mark.parametrize("aligner", ["reference", "fixed"])
def test_same_prompt_and_one_to_one_swap_are_identity(aligner):
    assert torch.equal(replacement_mapper("a cat in forest", "a cat in forest", encode, decode, aligner),
                       torch.eye(77))
    assert torch.equal(replacement_mapper("a cat in forest", "a tiger in forest", encode, decode, aligner),
                       torch.eye(77))


def test_two_swaps_with_multi_token_words_one_to_one():
    m = replacement_mapper("a butterfly in forest", "a gnochi in tent", encode, decode, tokens=10)
    expected = torch.eye(10)  # butter→gno, fly→chi pairwise; forest→tent; the rest identity
    assert torch.equal(m, expected)


def test_tail_bug_against_the_fixed_aligner_when_the_target_word_is_longer():
    src, tgt = "a tent in forest", "a gnochi in forest"  # 'tent' 1 token, 'gnochi' 2: target offset +1 after it
    ref = replacement_mapper(src, tgt, encode, decode, "reference", tokens=12)
    fix = replacement_mapper(src, tgt, encode, decode, "fixed", tokens=12)
    for m in (ref, fix):
        assert m.shape == (12, 12) and m.dtype == torch.float32
        assert m[2, 2] == m[2, 3] == 0.5 and m[2].sum() == 1  # 'tent' shared out over 'gno', 'chi'
        assert torch.equal(m[:2, :2], torch.eye(2))
    # reference: target j ≥ 4 reads source j ('in' ← 'forest', 'forest' ← EOS); source 'in' (3) feeds nothing
    assert ref[4, 4] == 1 and ref[5, 5] == 1 and ref[3].sum() == 0
    assert torch.equal(ref[4:, 4:], torch.eye(8))
    # fixed: target j ← source j − 1 ('in' ← 'in', 'forest' ← 'forest', EOS ← EOS)
    assert fix[3, 4] == 1 and fix[4, 5] == 1 and fix[5, 6] == 1
    assert torch.equal(fix[3:11, 4:], torch.eye(8))
    assert (fix.sum(0)[4:] == 1).all() and (ref.sum(0)[4:] == 1).all()  # every later target token fed once

    p_src = torch.rand(2, 5, 12).softmax(-1)
    p_ref, p_fix = edited(ref, p_src), edited(fix, p_src)
    assert torch.equal(p_ref[..., 4], p_src[..., 4]) and torch.equal(p_fix[..., 4], p_src[..., 3])
    assert torch.allclose(p_fix[..., 2], p_src[..., 2] / 2)


def test_tail_bug_leaves_the_last_targets_empty_when_the_source_word_is_longer():
    src, tgt = "a gnochi in forest", "a tent in forest"
    ref = replacement_mapper(src, tgt, encode, decode, "reference", tokens=10)
    fix = replacement_mapper(src, tgt, encode, decode, "fixed", tokens=10)
    for m in (ref, fix):
        assert m[2, 2] == 1 and m[3, 2] == 1  # both source pieces feed 'tent' with weight 1/1
    assert ref[3, 3] == 1 and ref[4, 4] == 1  # 'in' ← 'chi', 'forest' ← 'in'
    assert ref[:, 9].sum() == 0 and (ref.sum(0)[:9] > 0).all()  # the loop ran out of source rows first
    assert fix[4, 3] == 1 and fix[5, 4] == 1 and fix[6, 5] == 1  # 'in' ← 'in', 'forest' ← 'forest', EOS ← EOS
    assert fix[9, 8] == 1 and fix[9, 9] == 1 and (fix.sum(0) > 0).all()


def test_replacement_errors():
    with pytest.raises(ValueError, match=r"same number of words.*source has 2, target 3\): use refine"):
        replacement_mapper("a cat", "a sitting cat", encode, decode)
    with pytest.raises(ValueError, match="aligner"):
        replacement_mapper("a cat", "a dog", encode, decode, "best")
    with pytest.raises(ValueError, match="tokens"):
        replacement_mapper("a cat in forest", "a dog in forest", encode, decode, tokens=5)


# --- refinement mapper (design §1.2 #5) -------------------------------------------------------------------------------

def test_refine_inserted_word():
    mapper, alphas = refinement_mapper(ids("a dog"), ids("a sitting dog"), tokens=10)
    # target BOS, a ← 0, 1; 'sitting' new; dog, EOS ← 2, 3; from the target's length (5) on, each position maps to
    # itself, so source position 4 (its first pad) is never read
    assert mapper.tolist() == [0, 1, -1, 2, 3, 5, 6, 7, 8, 9]
    assert alphas.tolist() == [1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    assert mapper.dtype == torch.long and alphas.dtype == torch.float32


def test_refine_deleted_and_substituted_words():
    mapper, alphas = refinement_mapper(ids("a red dog"), ids("a dog"), tokens=8)
    assert mapper.tolist() == [0, 1, 3, 4, 4, 5, 6, 7] and (alphas == 1).all()
    mapper, _ = refinement_mapper(ids("a cat"), ids("a dog"), tokens=6)
    assert mapper.tolist() == [0, 1, -1, 3, 4, 5]  # gap 0 beats a mismatch (−1): 'dog' is inserted, 'cat' deleted


def test_refine_tie_break_prefers_insertion():
    # 'a' vs 'a a': both target a's could take the source 'a'; the left-first traceback keeps the first one
    mapper, alphas = refinement_mapper(ids("a"), ids("a a"), tokens=6)
    assert mapper.tolist() == [0, 1, -1, 2, 4, 5] and alphas.tolist() == [1, 1, 0, 1, 1, 1]


def test_refine_identical_and_too_long():
    mapper, alphas = refinement_mapper(ids("a cat in forest"), ids("a cat in forest"))
    assert torch.equal(mapper, torch.arange(77)) and (alphas == 1).all()
    with pytest.raises(ValueError, match="tokens"):
        refinement_mapper(ids("a cat"), ids("a cat in forest"), tokens=5)


# --- re-weighting -----------------------------------------------------------------------------------------------------

def test_parse_reweight():
    assert parse_reweight("tiger:2, striped:1.5") == [("tiger", 2.0), ("striped", 1.5)]
    assert parse_reweight(" tiger : -1 ;cat:0 ") == [("tiger", -1.0), ("cat", 0.0)]
    assert parse_reweight("") == [] and parse_reweight("  ") == []


@pytest.mark.parametrize("text, match", [
    ("tiger", "cannot read 'tiger'"),
    ("tiger:2:3", "cannot read 'tiger:2:3'"),
    (":2", "cannot read ':2'"),
    ("tiger:two", "factor of 'tiger:two' is not a number"),
    ("tiger:inf", "factor of 'tiger:inf' must be finite"),
    ("tiger:2,,cat:1", "item 2 .* is empty"),
    ("striped tiger:2", "'striped tiger' .* is not one word"),
])
def test_parse_reweight_errors_name_the_item(text, match):
    with pytest.raises(ValueError, match=match):
        parse_reweight(text)


def test_equalizer():
    eq = equalizer("a gnochi in forest", [("gnochi", 2.0), ("forest", 0.5)], encode, decode)
    expected = torch.ones(77)
    expected[[2, 3]], expected[5] = 2.0, 0.5
    assert torch.equal(eq, expected)
    assert torch.equal(equalizer("a cat", [], encode, decode), torch.ones(77))
    eq = equalizer("a cat, sitting", [("cat", 3.0)], encode, decode, tokens=8)  # punctuation-stripped fallback
    assert eq.tolist() == [1, 1, 3, 3, 1, 1, 1, 1]


def test_equalizer_names_a_missing_word_and_the_prompt_words():
    with pytest.raises(ValueError, match=r"'dog' is not a word of the prompt 'a cat in forest'.*\['a', 'cat', 'in', "):
        equalizer("a cat in forest", [("dog", 2.0)], encode, decode)


def test_blend_weights():
    w = blend_weights("a gnochi in forest", ["gnochi", "forest"], encode, decode, tokens=8)
    assert w.tolist() == [0, 0, 1, 1, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="local blend word 'cat'"):
        blend_weights("a dog", ["cat"], encode, decode)


# --- LocalBlend (design §1.2 #3, §3) ----------------------------------------------------------------------------------

def _store(cells, grid, heads=2, layers=5, word=(2, 3)):
    """Five layers of (B, heads, h'·w', 77) maps: a faint uniform background and, for item b, a blob at cells[b] on
    token word[b]."""
    h, w = grid
    maps = torch.full((len(cells), heads, h * w, 77), 0.01)
    for b, (r, c) in enumerate(cells):
        maps[b, :, r * w + c, word[b]] = 1.0
    return [maps.clone() for _ in range(layers)]


def _expected(cell, grid, latent):
    """The 3×3 max-pool of one cell, upsampled by nearest (integer factor)."""
    (r, c), (h, w) = cell, grid
    m = torch.zeros(h, w, dtype=torch.bool)
    m[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = True
    return m.repeat_interleave(latent[0] // h, 0).repeat_interleave(latent[1] // w, 1)


def test_local_blend_mask_finds_the_blob_and_unites_with_item_0():
    grid, latent = (4, 6), (16, 24)
    store = _store([(2, 1), (0, 5)], grid)
    weights = torch.zeros(2, 77)
    weights[0, 2] = weights[1, 3] = 1.0
    mask = local_blend_mask(store, weights, 0.3, latent)
    assert mask.shape == (2, 1, 16, 24) and mask.dtype == torch.bool
    own0, own1 = _expected((2, 1), grid, latent), _expected((0, 5), grid, latent)
    assert torch.equal(mask[0, 0], own0)
    assert torch.equal(mask[1, 0], own0 | own1)


def test_local_blend_mask_word_weights_select_tokens():
    store = _store([(2, 1), (0, 5)], (4, 6))
    weights = torch.zeros(2, 77)
    weights[:, 10] = 1.0  # a token without blobs: uniform maps, everything above the threshold
    assert local_blend_mask(store, weights, 0.3, (16, 24)).all()
    assert not local_blend_mask(store, torch.zeros(2, 77), 0.3, (16, 24)).any()  # no words: nothing blends


def test_local_blend_mask_odd_latent_sizes():
    # a 9×13 latent: the UNet halves with ceil, 5×7 then 3×4 at the 1/32 level (12 queries)
    store = _store([(1, 2), (2, 3)], (3, 4))
    weights = torch.zeros(2, 77)
    weights[0, 2] = weights[1, 3] = 1.0
    mask = local_blend_mask(store, weights, 0.3, (9, 13))
    assert mask.shape == (2, 1, 9, 13) and mask[0].any() and not mask[0].all()
    with pytest.raises(ValueError, match="13 queries"):
        local_blend_mask([torch.rand(2, 2, 13, 77)], weights, 0.3, (9, 13))


def test_blend_keeps_item_0_and_takes_the_target_inside_the_mask():
    z = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[:, :, 2:5, 3:6] = True
    out = blend(z, mask)
    assert torch.equal(out[0], z[0])
    assert torch.equal(out[1][:, ~mask[1, 0]], z[0][:, ~mask[1, 0]])
    assert torch.allclose(out[1][:, mask[1, 0]], z[1][:, mask[1, 0]], atol=1e-6)
