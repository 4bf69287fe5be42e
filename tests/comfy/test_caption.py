"""Forgedit Caption with a tiny random BLIP in a temporary models/blip folder (no network), and the source-prompt rule."""
import gc

import numpy as np
import pytest
import torch
from conftest import run_node
from forgedit_ops.caption import source_prompt, to_pil
from tiny_models import sample_image

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "cat", "dog", "red", "disc", "on",
         "blue", "the", "sitting", "window"]


@pytest.fixture(scope="session")
def blip_root(tmp_path_factory):
    """A models/blip folder holding `tiny-blip`: a random BLIP captioner laid out like the Hugging Face folder."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration
    from transformers.models.blip import BlipImageProcessorPil

    root = tmp_path_factory.mktemp("blip")
    folder = root / "tiny-blip"
    folder.mkdir()
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(root / "vocab.txt"), bos_token="[DEC]")
    ids = {w: i for i, w in enumerate(WORDS)}
    config = BlipConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, encoder_hidden_size=32,
                         bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(1)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return root


@pytest.fixture
def blip_folder(comfy, monkeypatch):
    """Point ComfyUI's `blip` model folder somewhere else for one test; the global table is restored afterwards."""
    import folder_paths

    def use(path):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, "blip", ([str(path)], set()))
    return use


def reference_caption(folder, image) -> str:
    """The reference's captioning: processor on the original PIL image, greedy generate, 20 tokens, special tokens skipped."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
    model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True).float()
    with torch.inference_mode():
        out = model.generate(**processor(images=to_pil(image), return_tensors="pt"), max_length=20, num_beams=1,
                             do_sample=False)
    return processor.decode(out[0], skip_special_tokens=True)


def test_the_blip_folder_is_registered(comfy):
    import os

    import folder_paths

    assert os.path.join(folder_paths.models_dir, "blip") in folder_paths.get_folder_paths("blip")


def test_caption_is_the_reference_caption_and_blip_is_freed(comfy, blip_root, blip_folder):
    from transformers import BlipForConditionalGeneration

    blip_folder(blip_root)
    node = comfy.nodes.NODE_CLASS_MAPPINGS["ForgeditCaption"]
    assert node.INPUT_TYPES()["required"]["blip_model"][1]["options"] == ["tiny-blip"]
    image = sample_image(96, 64)
    caption, = run_node("ForgeditCaption", image=image, blip_model="tiny-blip")
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is BlipForConditionalGeneration]
    assert isinstance(caption, str) and caption.strip()
    assert caption == reference_caption(str(blip_root / "tiny-blip"), image[0])


def test_caption_applies_the_a_photo_of_rule(comfy, blip_root, blip_folder):
    blip_folder(blip_root)
    plain, = run_node("ForgeditCaption", image=sample_image(), blip_model="tiny-blip")
    prefixed, = run_node("ForgeditCaption", image=sample_image(), blip_model="tiny-blip", target_prompt="A photo of a dog")
    lower, = run_node("ForgeditCaption", image=sample_image(), blip_model="tiny-blip", target_prompt="a photo of a dog")
    assert prefixed == "A photo of " + plain and lower == plain


def test_missing_blip_gives_the_install_instructions(comfy, tmp_path, blip_folder):
    blip_folder(tmp_path / "nothing")
    node = comfy.nodes.NODE_CLASS_MAPPINGS["ForgeditCaption"]
    options = node.INPUT_TYPES()["required"]["blip_model"][1]["options"]
    assert len(options) == 1
    for name in (options[0], "blip-image-captioning-base"):
        with pytest.raises(ValueError, match=r"Salesforce/blip-image-captioning-base.*ComfyUI/models/blip/<name>/"):
            run_node("ForgeditCaption", image=sample_image(), blip_model=name)


def test_caption_rejects_a_batch(comfy, blip_root, blip_folder):
    blip_folder(blip_root)
    with pytest.raises(ValueError, match="batch of 2"):
        run_node("ForgeditCaption", image=torch.rand(2, 64, 64, 3), blip_model="tiny-blip")


@pytest.mark.parametrize("target, expected", [
    ("A photo of a sitting dog", "A photo of a dog"),
    ("a sitting dog", "a dog"),
    ("a photo of a sitting dog", "a dog"),
    ("Sitting. A photo of it", "A photo of a dog"),
    ("A photo ofa dog", "a dog"),
])
def test_source_prompt_rule(target, expected):
    assert source_prompt("a dog", target) == expected


def test_to_pil_gives_back_the_8_bit_image():
    pixels = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    image = to_pil(pixels.float() / 255)
    assert image.size == (7, 5) and image.mode == "RGB"
    assert torch.equal(torch.from_numpy(np.array(image)), pixels)


def test_an_incomplete_blip_folder_says_what_is_missing(comfy, tmp_path, blip_folder):
    (tmp_path / "half-downloaded").mkdir()
    blip_folder(tmp_path)
    with pytest.raises(ValueError, match="cannot load the BLIP model in .*half-downloaded.*Salesforce"):
        run_node("ForgeditCaption", image=sample_image(), blip_model="half-downloaded")
