"""P2P's word positions and mappers with ComfyUI's own SD1 tokenizer (an HF CLIPTokenizer), on the hand-checked cases
of design §8.1 test_refine_and_aligner."""
import pytest
import torch
from forgedit_ops.p2p import equalizer, refinement_mapper, replacement_mapper, word_indices


@pytest.fixture(scope="module")
def clip_tokenizer(comfy):
    import comfy.sd1_clip

    return comfy.sd1_clip.SD1Tokenizer().clip_l.tokenizer


@pytest.fixture(scope="module")
def codec(clip_tokenizer):
    return (lambda text: clip_tokenizer.encode(text)[1:-1]), (lambda token: clip_tokenizer.decode([token]))


def test_the_tokenizer_splits_gnochi_in_two(codec):
    encode, decode = codec
    assert [decode(t) for t in encode("a gnochi in forest")] == ["a", "gno", "chi", "in", "forest"]
    assert word_indices("a gnochi in forest", "gnochi", *codec) == [2, 3]
    assert word_indices("a gnochi in forest", "forest", *codec) == [5]
    assert word_indices("a cat, sitting next to a mirror", "cat,", *codec) == [2, 3]
    assert word_indices("a cat sitting next to a mirror", "a", *codec) == [1, 6]


@pytest.mark.parametrize("aligner", ["reference", "fixed"])
def test_cat_to_tiger_is_one_to_one(codec, aligner):
    m = replacement_mapper("a cat sitting next to a mirror", "a tiger sitting next to a mirror", *codec, aligner)
    assert torch.equal(m, torch.eye(77))


def test_tent_to_gnochi_reference_tail_and_fixed(codec):
    src, tgt = "a tent in forest", "a gnochi in forest"
    ref = replacement_mapper(src, tgt, *codec, "reference")
    fix = replacement_mapper(src, tgt, *codec, "fixed")
    for m in (ref, fix):
        assert m[2, 2] == m[2, 3] == 0.5 and m[0, 0] == m[1, 1] == 1
    # target 'in' (4) and 'forest' (5): the reference reads source 4 ('forest') and 5 (EOS), fixed source 3 and 4
    assert ref[:, 4].nonzero().flatten().tolist() == [4] and ref[:, 5].nonzero().flatten().tolist() == [5]
    assert fix[:, 4].nonzero().flatten().tolist() == [3] and fix[:, 5].nonzero().flatten().tolist() == [4]
    assert (ref.sum(0)[4:] == 1).all() and (fix.sum(0)[4:] == 1).all()


def test_refine_a_dog_to_a_sitting_dog(clip_tokenizer):
    mapper, alphas = refinement_mapper(clip_tokenizer.encode("a dog"), clip_tokenizer.encode("a sitting dog"))
    assert mapper[:6].tolist() == [0, 1, -1, 2, 3, 5]
    assert torch.equal(mapper[5:], torch.arange(5, 77))
    assert alphas[:6].tolist() == [1, 1, 0, 1, 1, 1] and (alphas[6:] == 1).all()


def test_equalizer_on_real_tokens(codec):
    eq = equalizer("a gnochi in forest", [("gnochi", 2.0)], *codec)
    assert eq[[2, 3]].tolist() == [2.0, 2.0] and eq.sum() == 77 + 2
