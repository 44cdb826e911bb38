"""Processor for KIF-ISD: chest X-ray images in, diagnosis-prompted decoder inputs and report text out.

`KifImageProcessor` turns any PIL image (8- or 16-bit grayscale, palette, RGB, RGBA, very large) into the
normalised 224x224 RGB tensor the ResNet encoder expects; `KifProcessor` adds the BERT WordPiece tokenizer
with the prompt tokens `[DEC] [BLA] [POS] [NEG] [UNC]`, report cleaning, training inputs with the prompt
masked out of the labels, and decoding of generated sequences back to report text.

This file is shipped with saved models as custom code: it imports nothing from training-only code.
"""

import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from transformers import AutoImageProcessor, AutoProcessor, BertTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin


try:
    from .configuration_kif import (
        AUXILIARY_OBSERVATIONS,
        CHEXPERT_OBSERVATIONS,
        DECODER_START_TOKEN,
        FINDING_STATES,
        STATE_TOKENS,
        KifConfig,
    )
except ImportError:  # imported as a top-level module (project installed or on sys.path), not as remote code
    from configuration_kif import (
        AUXILIARY_OBSERVATIONS,
        CHEXPERT_OBSERVATIONS,
        DECODER_START_TOKEN,
        FINDING_STATES,
        STATE_TOKENS,
        KifConfig,
    )


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Code of the "blank" state, used for observations a label row does not cover (14-label val/test rows).
BLANK_STATE = 0
# Loss-ignore index of torch's cross-entropy (and of transformers' LM losses).
IGNORE_INDEX = -100

# ---------------------------------------------------------------------------------------------------------
# Report cleaning
# ---------------------------------------------------------------------------------------------------------
# R2Gen's cleaners (Chen et al., EMNLP 2020), which PromptMRG and KIF-ISD inherit. No library provides them,
# and published BLEU/CIDEr numbers depend on their exact output, so they are ported quirks included: the
# character class `:-\[` is a range (':' .. '['), which also strips upper-case letters and `;<=>?@`, and
# empty sentences are kept (the original's `!= []` test never filtered anything).
_SENTENCE_PUNCTUATION = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")
_NUMBERED_LIST = (("1. ", ""), (". 2. ", ". "), (". 3. ", ". "), (". 4. ", ". "), (". 5. ", ". "),
                  (" 2. ", ". "), (" 3. ", ". "), (" 4. ", ". "), (" 5. ", ". "))  # fmt: skip


def _collapse(text: str, pair: str, single: str, times: int) -> str:
    for _ in range(times):
        text = text.replace(pair, single)
    return text


def _clean_sentence(sentence: str) -> str:
    for char in ('"', "/", "\\", "'"):
        sentence = sentence.replace(char, "")
    return _SENTENCE_PUNCTUATION.sub("", sentence.strip().lower())


def _split_sentences(text: str) -> list[str]:
    for old, new in _NUMBERED_LIST:
        text = text.replace(old, new)
    return text.strip().lower().split(". ")


def clean_report_iu_xray(report: str) -> str:
    """R2Gen's IU X-Ray report cleaning: lower case, numbered lists and punctuation removed, ' . ' between sentences."""
    text = _collapse(report, "..", ".", 3)
    return " . ".join(_clean_sentence(sentence) for sentence in _split_sentences(text)) + " ."


def clean_report_mimic_cxr(report: str) -> str:
    """R2Gen's MIMIC-CXR report cleaning: as IU X-Ray, plus newlines, runs of '_' and of spaces collapsed."""
    text = report.replace("\n", " ")
    text = _collapse(text, "__", "_", 7)
    text = _collapse(text, "  ", " ", 6)
    text = _collapse(text, "..", ".", 8)
    return " . ".join(_clean_sentence(sentence) for sentence in _split_sentences(text)) + " ."


REPORT_CLEANERS = {"iu_xray": clean_report_iu_xray, "mimic_cxr": clean_report_mimic_cxr}


def clean_report(report: str, dataset: str = "mimic_cxr") -> str:
    """Clean a report with the cleaner of `dataset` (`"mimic_cxr"` or `"iu_xray"`)."""
    if dataset not in REPORT_CLEANERS:
        raise ValueError(f"Unknown report cleaner {dataset!r}; choose one of {sorted(REPORT_CLEANERS)}.")
    return REPORT_CLEANERS[dataset](report)


# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------
# PIL modes holding more than 8 bits per pixel; `Image.convert("RGB")` would clip them at 255.
_HIGH_BIT_DEPTH_MAXIMUM = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0}


def pil_to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    """Convert a PIL image of any mode to a float RGB tensor (3,H,W) in [0, 1].

    16-bit images are scaled by their full range (value / 65535), never clipped; 32-bit integer ("I") and
    float ("F") images, whose range has no fixed maximum, are min-max scaled. Transparent pixels of RGBA/LA
    and palette images are composited on black, the background of a radiograph.
    """
    mode = image.mode
    if mode in _HIGH_BIT_DEPTH_MAXIMUM or mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        if mode in _HIGH_BIT_DEPTH_MAXIMUM:
            pixels = pixels / _HIGH_BIT_DEPTH_MAXIMUM[mode]
        else:
            low, high = float(pixels.min()), float(pixels.max())
            pixels = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
        return torch.from_numpy(pixels).unsqueeze(0).expand(3, -1, -1)
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div_(255.0)


class KifImageProcessor(BaseImageProcessor):
    r"""
    The image transforms of R2Gen/PromptMRG, with torchvision.

    Eval: resize the shorter side to `size`, centre crop `crop_size`, normalise. Train (`augment=True`): resize,
    random crop, random rotation of up to `rotation_degrees`, normalise.

    Args:
        size (`int`, defaults to 256): Target of the shorter side before cropping.
        crop_size (`int`, defaults to 224): Side of the square crop fed to the encoder.
        rotation_degrees (`float`, defaults to 5): Maximum random rotation of the train transform.
        image_mean (`tuple[float]`): Normalisation mean (ImageNet).
        image_std (`tuple[float]`): Normalisation std (ImageNet).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = 256,
        crop_size: int = 224,
        rotation_degrees: float = 5.0,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = size
        self.crop_size = crop_size
        self.rotation_degrees = rotation_degrees
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def _transform(self, augment: bool) -> T.Compose:
        resize = T.Resize(self.size, antialias=True)
        normalize = T.Normalize(self.image_mean, self.image_std)
        if augment:
            return T.Compose(
                [resize, T.RandomCrop(self.crop_size), T.RandomRotation(self.rotation_degrees), normalize]
            )
        return T.Compose([resize, T.CenterCrop(self.crop_size), normalize])

    def _shrink(self, image: Image.Image) -> Image.Image:
        """Downscale very large 8-bit images in PIL first: resizing a 3000x3000 float tensor is slow and memory-hungry."""
        if image.mode not in ("L", "RGB") or min(image.size) <= 2 * self.size:
            return image
        scale = 2 * self.size / min(image.size)
        return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)

    def preprocess(self, images, augment: bool = False, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Transform one image or a list of images (PIL images, or uint8 arrays (H,W) / (H,W,3)).

        Returns a `BatchFeature` with `pixel_values` of shape (B, 3, crop_size, crop_size).
        """
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        transform = self._transform(augment)
        tensors = []
        for index, image in enumerate(images):
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            if not isinstance(image, Image.Image):
                raise ValueError(f"Image {index} is a {type(image).__name__}; expected a PIL image or a numpy array.")
            tensors.append(transform(pil_to_rgb_tensor(self._shrink(image))))
        return BatchFeature({"pixel_values": torch.stack(tensors)}, tensor_type=return_tensors)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def prepare_report_tokenizer(tokenizer: BertTokenizer) -> BertTokenizer:
    """Add `[DEC]` (decoder start, used as BOS) and the four state tokens to a BERT tokenizer as unsplittable special
    tokens (e.g. to bert-base-uncased, whose ids 30522..30526 they then take)."""
    tokenizer.add_special_tokens({"bos_token": DECODER_START_TOKEN, "additional_special_tokens": list(STATE_TOKENS)})
    return tokenizer


def decode_without_cleanup(tokenizer: BertTokenizer) -> None:
    """Decode without BERT's clean-up, which glues punctuation to the preceding word ("normal ." -> "normal.") and so
    would not match R2Gen-cleaned references token for token. Set on every load: BertTokenizer rebuilds its decoder."""
    from tokenizers import decoders

    tokenizer.backend_tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.clean_up_tokenization_spaces = False


def train_report_tokenizer(reports: Iterable[str], vocab_size: int = 1000, min_frequency: int = 1) -> BertTokenizer:
    """Train a lower-cased BERT WordPiece tokenizer on a report corpus and add the prompt tokens.

    Uses the `tokenizers` library's WordPiece trainer with BERT's normaliser and pre-tokeniser, so the result
    behaves exactly like bert-base-uncased's tokenizer with a smaller, domain-specific vocabulary.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(BERT_SPECIAL_TOKENS)
    )
    backend.train_from_iterator(reports, trainer)
    return prepare_report_tokenizer(BertTokenizer(vocab=backend.get_vocab()))


# ---------------------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------------------
class KifProcessor(ProcessorMixin):
    r"""
    Image processor + BERT WordPiece tokenizer for KIF-ISD.

    Decoder sequences are `[DEC] s_1 ... s_18 report [SEP]`, where `s_i` is the state token of observation `i`
    (`[BLA] [POS] [NEG] [UNC]`). In training the states come from the ground-truth labels; at inference the model
    predicts them. The prompt positions never carry LM loss.

    Args:
        image_processor ([`KifImageProcessor`]): The image transforms.
        tokenizer ([`BertTokenizer`]): WordPiece tokenizer that knows the prompt tokens.
        num_observations (`int`, defaults to 18): States in the diagnosis prompt.
        max_length (`int`, defaults to 512): Longest tokenised training sequence (prompt included).
    """

    def __init__(
        self, image_processor=None, tokenizer=None, num_observations: int = 18, max_length: int = 512, **kwargs
    ):
        super().__init__(image_processor, tokenizer, **kwargs)
        missing = [token for token in (DECODER_START_TOKEN, *STATE_TOKENS) if token not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"The tokenizer lacks the prompt tokens {missing}; add them with `prepare_report_tokenizer`."
            )
        decode_without_cleanup(tokenizer)
        self.num_observations = num_observations
        self.max_length = max_length

    @property
    def prompt_length(self) -> int:
        return 1 + self.num_observations

    @property
    def state_token_ids(self) -> list[int]:
        """Token id of each state, indexed by state code (0 blank, 1 positive, 2 negative, 3 uncertain)."""
        return self.tokenizer.convert_tokens_to_ids(list(STATE_TOKENS))

    def _state_row(self, findings: Sequence[int] | None, row: int) -> list[int]:
        """One row of finding states, padded with blanks to `num_observations` (val/test files carry only 14)."""
        states = [BLANK_STATE] * self.num_observations if findings is None else [int(state) for state in findings]
        if len(states) > self.num_observations:
            raise ValueError(f"findings[{row}] has {len(states)} states; the prompt has {self.num_observations}.")
        if any(not 0 <= state < len(STATE_TOKENS) for state in states):
            raise ValueError(f"findings[{row}] = {states} has a state outside 0..{len(STATE_TOKENS) - 1}.")
        return states + [BLANK_STATE] * (self.num_observations - len(states))

    def build_prompt_ids(self, findings: Sequence[Sequence[int] | None]) -> torch.LongTensor:
        """Token ids (B, 1 + num_observations) of the diagnosis prompts `[DEC] s_1 ... s_n` of a batch."""
        lookup = torch.tensor(self.state_token_ids)
        states = torch.tensor([self._state_row(row, index) for index, row in enumerate(findings)], dtype=torch.long)
        start = torch.full((states.shape[0], 1), self.tokenizer.bos_token_id, dtype=torch.long)
        return torch.cat([start, lookup[states]], dim=1)

    def build_prompt(self, findings: Sequence[int] | None) -> str:
        """The diagnosis prompt of one report as text, e.g. `[DEC] [NEG] [POS] [BLA] ...`."""
        states = self._state_row(findings, 0)
        return " ".join([DECODER_START_TOKEN, *(STATE_TOKENS[state] for state in states)])

    def tokenize_reports(self, reports: Sequence[str], findings: Sequence[Sequence[int] | None]) -> dict:
        """Training inputs: `[DEC] states report [SEP]`, with prompt and padding masked out of `labels`."""
        if len(reports) != len(findings):
            raise ValueError(f"Got {len(reports)} reports but {len(findings)} rows of findings.")
        for index, report in enumerate(reports):
            if not isinstance(report, str) or not report.strip():
                raise ValueError(f"Report {index} is empty; every training report needs text.")
        body = self.tokenizer(
            list(reports),
            add_special_tokens=False,
            truncation=True,
            max_length=self.max_length - self.prompt_length - 1,
        )["input_ids"]
        prompts = self.build_prompt_ids(findings)
        sep, pad = self.tokenizer.sep_token_id, self.tokenizer.pad_token_id
        sequences = [prompt.tolist() + tokens + [sep] for prompt, tokens in zip(prompts, body)]
        width = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        labels[:, : self.prompt_length] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        findings: Sequence[Sequence[int] | None] | None = None,
        augment: bool = False,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Prepare model inputs.

        Args:
            images: PIL image(s) -> `pixel_values` (B, 3, 224, 224).
            text: report(s) -> `input_ids`, `attention_mask`, `labels` (training inputs with the diagnosis prompt).
            findings: per report, the finding states (18, or 14 padded with blanks) that form its prompt.
                Defaults to all-blank prompts.
            augment: use the train image transform.
        """
        if images is None and text is None:
            raise ValueError("Pass `images`, `text` or both.")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, augment=augment, return_tensors=None))
        if text is not None:
            reports = [text] if isinstance(text, str) else list(text)
            rows = findings if findings is not None else [None] * len(reports)
            data.update(self.tokenize_reports(reports, rows))
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Decode generated sequences to report text only: the diagnosis prompt is cut off, and with
        `skip_special_tokens` (default) no `[DEC]`/state/`[SEP]`/`[PAD]` token reaches the text."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        reports = [self._strip_prompt(list(sequence)) for sequence in sequences]
        return self.tokenizer.batch_decode(reports, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, sequence, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.batch_decode([sequence], skip_special_tokens=skip_special_tokens, **kwargs)[0]

    def _strip_prompt(self, sequence: list[int]) -> list[int]:
        if sequence and sequence[0] == self.tokenizer.bos_token_id:
            return sequence[self.prompt_length :]
        return sequence

    def findings_to_dict(self, states: Sequence[int], probabilities: Sequence[Sequence[float]] | None = None) -> dict:
        """Readable findings of one image: `{observation: {"state": "positive", "probability": 0.93}}`."""
        names = list(CHEXPERT_OBSERVATIONS + AUXILIARY_OBSERVATIONS)[: self.num_observations]
        result = {}
        for index, (name, state) in enumerate(zip(names, states)):
            entry = {"state": FINDING_STATES[int(state)]}
            if probabilities is not None:
                entry["probability"] = float(probabilities[index][int(state)])
            result[name] = entry
        return result

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask", "labels"]


# Saved processors name their classes in `auto_map` (loadable with trust_remote_code=True); in this process the
# Auto classes resolve to them directly.
KifImageProcessor.register_for_auto_class("AutoImageProcessor")
KifProcessor.register_for_auto_class("AutoProcessor")
AutoImageProcessor.register(
    KifConfig, image_processor_classes={"pil": KifImageProcessor, "torchvision": KifImageProcessor}, exist_ok=True
)
AutoProcessor.register(KifConfig, KifProcessor, exist_ok=True)

__all__ = ["KifImageProcessor", "KifProcessor", "clean_report", "prepare_report_tokenizer", "train_report_tokenizer"]
