import numpy as np
import pytest
import torch
from PIL import Image

from configuration_kif import DECODER_START_TOKEN, STATE_TOKENS
from kif_testing import TINY_DIR
from processing_kif import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KifImageProcessor,
    KifProcessor,
    clean_report,
    pil_to_rgb_tensor,
    train_report_tokenizer,
)


@pytest.fixture(scope="module")
def processor():
    return KifProcessor.from_pretrained(TINY_DIR)


def unnormalise(pixel_values: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return pixel_values * std + mean


def saved_and_reopened(image: Image.Image, path) -> Image.Image:
    image.save(path)
    return Image.open(path)


# --------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "RGBA", "P"])
def test_real_image_files_of_each_mode_go_through(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (300, 260), dtype=np.uint16))
    elif mode == "P":
        image = Image.fromarray(rng.integers(0, 255, (300, 260), dtype=np.uint8)).convert("P")
    else:
        channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
        image = Image.fromarray(rng.integers(0, 255, (300, 260, *channels), dtype=np.uint8), mode)
    reopened = saved_and_reopened(image, tmp_path / f"image_{mode.replace(';', '')}.png")
    assert reopened.mode == mode
    pixel_values = KifImageProcessor()(reopened)["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224) and pixel_values.dtype == torch.float32
    restored = unnormalise(pixel_values[0])
    assert restored.min() >= -1e-4 and restored.max() <= 1 + 1e-4
    if mode in ("L", "I;16", "P"):  # grey inputs give three equal channels
        torch.testing.assert_close(restored[0], restored[1])


def test_sixteen_bit_values_are_scaled_by_the_full_range_not_clipped():
    pixels = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16)
    tensor = pil_to_rgb_tensor(Image.fromarray(pixels))
    expected = torch.tensor([0, 1000, 40000, 65535]) / 65535
    torch.testing.assert_close(tensor[0, 0], expected)
    assert tensor[0, 0, 2] < tensor[0, 0, 3]  # a clipping conversion would make both 1.0


def test_transparent_pixels_become_black():
    image = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    assert pil_to_rgb_tensor(image).max() == 0


def test_very_large_images_convert(tmp_path):
    large = Image.fromarray(np.full((3000, 4000), 128, dtype=np.uint8))
    pixel_values = KifImageProcessor()(large)["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)
    torch.testing.assert_close(unnormalise(pixel_values[0]), torch.full((3, 224, 224), 128 / 255), atol=2e-3, rtol=0)


def test_eval_transform_is_deterministic_and_train_transform_augments():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 300), dtype=np.uint8))
    image_processor = KifImageProcessor()
    first = image_processor(image)["pixel_values"]
    assert torch.equal(first, image_processor(image)["pixel_values"])
    torch.manual_seed(0)
    augmented = image_processor(image, augment=True)["pixel_values"]
    assert augmented.shape == first.shape and not torch.equal(augmented, first)


def test_non_images_are_refused():
    with pytest.raises(ValueError, match="Image 1 is a str"):
        KifImageProcessor()([Image.new("L", (8, 8)), "scan.png"])


# --------------------------------------------------------------------------------------------- report cleaning
def test_iu_xray_cleaning_matches_r2gen():
    report = "1. The heart is normal in size. 2. No pleural effusion... Lungs: clear (bilaterally)."
    assert (
        clean_report(report, "iu_xray")
        == "the heart is normal in size . no pleural effusion . lungs clear bilaterally ."
    )
    # R2Gen's quirk, kept for comparable scores: a double space before a list number leaves an empty sentence.
    assert clean_report("Normal.  2. Clear.", "iu_xray") == "normal .  . clear ."


def test_mimic_cxr_cleaning_matches_r2gen():
    report = "FINDINGS:\n PA and lateral views.  The heart__size is normal.. No   acute process."
    expected = "findings pa and lateral views . the heart_size is normal . no acute process ."
    assert clean_report(report, "mimic_cxr") == expected.replace("heart_size", "heartsize")


def test_unknown_cleaner_is_refused():
    with pytest.raises(ValueError, match="Unknown report cleaner 'chexpert'"):
        clean_report("text", "chexpert")


# --------------------------------------------------------------------------------------------- text
def test_prompt_tokens_are_never_split(processor):
    tokens = processor.tokenizer.tokenize(" ".join([DECODER_START_TOKEN, *STATE_TOKENS]))
    assert tokens == [DECODER_START_TOKEN, *STATE_TOKENS]


def test_training_inputs_prepend_the_prompt_and_mask_it_out_of_labels(processor):
    findings = [[1] + [2] * 17, [3] * 14]  # a 14-label row gets blank auxiliary states
    batch = processor(text=["the heart is enlarged .", "no effusion ."], findings=findings)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    tokenizer = processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(ids[0, :3].tolist()) == ["[DEC]", "[POS]", "[NEG]"]
    assert tokenizer.convert_ids_to_tokens(ids[1, 14:16].tolist()) == ["[UNC]", "[BLA]"]  # 14 given, 4 blank
    assert bool((labels[:, : processor.prompt_length] == -100).all())
    assert bool((labels[mask == 0] == -100).all())
    report_positions = (mask == 1) & (torch.arange(ids.shape[1]) >= processor.prompt_length)
    assert torch.equal(labels[report_positions], ids[report_positions])
    lengths = mask.sum(1)
    assert ids[0, lengths[0] - 1] == tokenizer.sep_token_id


def test_bad_findings_and_empty_reports_are_refused(processor):
    with pytest.raises(ValueError, match=r"findings\[0\].*outside 0..3"):
        processor(text=["x ."], findings=[[5] * 18])
    with pytest.raises(ValueError, match="Report 1 is empty"):
        processor(text=["x .", "   "], findings=[None, None])


def test_batch_decode_returns_only_the_report(processor):
    batch = processor(text=["the heart size is normal ."], findings=[[2] * 18])
    assert processor.batch_decode(batch["input_ids"]) == ["the heart size is normal ."]


def test_findings_to_dict_names_each_observation(processor):
    probabilities = torch.full((18, 4), 0.25)
    findings = processor.findings_to_dict([1] + [2] * 17, probabilities.tolist())
    assert findings["Enlarged Cardiomediastinum"] == {"state": "positive", "probability": 0.25}
    assert findings["No Finding"]["state"] == "negative" and len(findings) == 18


def test_tokenizer_training_helper_learns_words_and_keeps_prompt_tokens():
    tokenizer = train_report_tokenizer(["mild cardiomegaly .", "no cardiomegaly ."] * 10, vocab_size=120)
    assert "cardiomegaly" in tokenizer.get_vocab()
    assert tokenizer.tokenize("[DEC] [POS] cardiomegaly") == ["[DEC]", "[POS]", "cardiomegaly"]


def test_processor_round_trip_gives_identical_outputs(tmp_path, processor):
    processor.save_pretrained(tmp_path)
    reloaded = KifProcessor.from_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (200, 240), dtype=np.uint8))
    original = processor(images=[image], text=["small left pleural effusion ."], findings=[[1] * 18])
    again = reloaded(images=[image], text=["small left pleural effusion ."], findings=[[1] * 18])
    for name in original:
        assert torch.equal(original[name], again[name])
    assert reloaded.image_processor.crop_size == processor.image_processor.crop_size
