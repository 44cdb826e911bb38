"""CheXpert labelers: the 14 CheXpert labels of free-text chest X-ray reports, for clinical-efficacy (CE) metrics.

Both labelers return, per report, 14 ints in the order of `CHEXPERT_OBSERVATIONS`, coded 0 blank (not mentioned),
1 positive, 2 negative, 3 uncertain — the coding of CheXbert's classes and of every label file of this project.

- `RuleBasedLabeler`: CheXpert-style rules (mentions, negation, uncertainty) from the phrase lists in
  `labeling_phrases/`. Needs no weights; thousands of reports per second.
- `CheXbertLabeler`: the CheXbert model (Smit et al. 2020; BERT-base + 14 linear heads) from the Stanford checkpoint.

Nothing heavy is loaded at import time: torch and transformers are imported when a `CheXbertLabeler` is built.
"""

import json
import os
import re
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from configuration_kif import CHEXPERT_OBSERVATIONS


BLANK, POSITIVE, NEGATIVE, UNCERTAIN = 0, 1, 2, 3
NO_FINDING_INDEX = CHEXPERT_OBSERVATIONS.index("No Finding")
SUPPORT_DEVICES_INDEX = CHEXPERT_OBSERVATIONS.index("Support Devices")
# Observations whose positive or uncertain label rules out "No Finding" (CheXpert: all but Support Devices).
PATHOLOGY_INDICES = tuple(
    index for index in range(len(CHEXPERT_OBSERVATIONS)) if index not in (NO_FINDING_INDEX, SUPPORT_DEVICES_INDEX)
)


# ---------------------------------------------------------------------------------------------------------------------
# Rule-based labeler
# ---------------------------------------------------------------------------------------------------------------------

PHRASES_DIR = Path(__file__).resolve().parent / "labeling_phrases"
MENTIONS_FILE = "mentions.json"
NEGATION_FILE = "negation.txt"
UNCERTAINTY_FILE = "uncertainty.txt"
SCOPE_FILE = "scope.txt"
PHRASE_KINDS = ("mention", "normal", "exclude")  # the phrase lists of an observation in MENTIONS_FILE
# An [after] cue applies to a mention at most this many words before it ("the effusion on the left has resolved"),
# so that in "effusion is present and the pneumothorax has resolved" the effusion stays positive.
POST_CUE_MAX_WORDS = 4
# Sentence ends (a full stop between digits, as in "1.5 cm", is not one) and line breaks.
SENTENCE_END = r"(?<!\d)\.|\.(?!\d)|[;:?!\n]"
# When several mentions of one observation disagree, the strongest wins (CheXpert's aggregation).
STATE_STRENGTH = {BLANK: 0, NEGATIVE: 1, UNCERTAIN: 2, POSITIVE: 3}
# The state of a pseudo-cue ("no change in"): it blocks the cues before it and changes nothing itself.
NEUTRAL = "neutral"


class _Cue(NamedTuple):
    start: int
    end: int
    state: int | str  # NEGATIVE, UNCERTAIN or NEUTRAL
    before: bool  # applies to a mention after it
    after: bool  # applies to a mention before it


class _CueKind(NamedTuple):
    pattern: re.Pattern
    state: int | str
    before: bool
    after: bool


class _ObservationRules(NamedTuple):
    index: int
    mention: re.Pattern
    normal: re.Pattern | None  # phrases that state the observation is absent ("heart size is normal")
    exclude: re.Pattern | None  # look-alikes that are not mentions ("pericardial effusion")


def _expand_phrase(phrase: str, macros: dict[str, str] | None = None) -> str:
    """A phrase as a regex: macros expanded, spaces matching any whitespace, groups non-capturing (much faster)."""
    for name, value in (macros or {}).items():
        phrase = phrase.replace(f"{{{name}}}", value)
    # A space matches any run of whitespace; " ?" (an optional space) matches none too.
    phrase = re.sub(r" +", r"\\s+", re.sub(r" \?", r"\\s*", phrase.strip()))
    return re.sub(r"(?<!\\)\((?!\?)", "(?:", phrase)


def _alternation(patterns: Sequence[str]) -> str:
    """One regex of several, longest first: at one position an alternation takes the first alternative that matches."""
    if not patterns:  # an empty alternation would match everywhere
        raise ValueError("A phrase list is empty.")
    return "|".join(f"(?:{pattern})" for pattern in sorted(patterns, key=len, reverse=True))


def _whole_words(alternation: str) -> str:
    return rf"\b(?:{alternation})\b"


def _phrase_pattern(phrases: Sequence[str], macros: dict[str, str] | None = None) -> re.Pattern:
    """The compiled whole-word alternation of a phrase list."""
    return re.compile(_whole_words(_alternation([_expand_phrase(phrase, macros) for phrase in phrases])))


def _read_sections(path: Path) -> dict[str, list[str]]:
    """A phrase file: `[section]` headers, one phrase per line, `#` comments."""
    sections, current = {}, None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif current is None:
            raise ValueError(f"{path}:{number}: phrase {line!r} comes before any [section] header.")
        else:
            current.append(line)
    return sections


class RuleBasedLabeler:
    """CheXpert-style rule-based labeler (Irvin et al. 2019, after NegBio), with regular expressions.

    Hand-written rather than the CheXpert labeler itself because that one needs a dependency parser (Bllip, Stanford
    CoreNLP) and Python 3.6-era pins, and takes about a second per report; these rules are pure `re`.

    Per report:
    1. Mentions: every match of an observation's phrases (`labeling_phrases/mentions.json`) that is not inside one of
       its look-alikes ("pericardial effusion" is no pleural effusion). A "normal" phrase ("heart size is normal",
       "cardiomediastinal silhouette is unremarkable") is a negative mention.
    2. Cues (`negation.txt`, `uncertainty.txt`, `scope.txt`) are matched as one alternation, longest first, so that
       "cannot be excluded" is one uncertainty cue and not a negation "not". Cues reach only within their clause
       (sentence, cut at words such as "but", "which", "there is"). A mention takes: a cue that overlaps it ("heart is
       borderline enlarged", "without consolidation to suggest pneumonia"); the nearest cue before it in its clause
       if that cue applies forwards ("no effusion, pneumothorax or consolidation"); and the first cue after it if that
       cue applies backwards and is at most `POST_CUE_MAX_WORDS` words away ("pneumothorax has resolved"). Negation
       beats uncertainty; no cue: positive.
    3. Per observation, positive beats uncertain beats negative; no mention: blank (0).
    4. "No Finding" is positive (1) when no observation other than Support Devices is positive or uncertain, as in
       CheXpert (so a report that mentions nothing is "No Finding"); otherwise blank (0). It is never negative.

    Args:
        phrases_dir: folder with the phrase files (default: `labeling_phrases/` beside this module).
    """

    def __init__(self, phrases_dir: str | os.PathLike = PHRASES_DIR):
        phrases_dir = Path(phrases_dir)
        mentions = json.loads((phrases_dir / MENTIONS_FILE).read_text(encoding="utf-8"))
        self._rules = self._compile_observations(mentions, phrases_dir / MENTIONS_FILE)
        self._cue_kinds = self._read_cues(phrases_dir)
        self._cue_pattern = re.compile(_whole_words(_alternation([kind.pattern.pattern for kind in self._cue_kinds])))
        self._cue_kind_of_text = {}  # cache of `_cue_kind`: reports repeat the same few cues
        breaks = _read_sections(phrases_dir / SCOPE_FILE).get("break")
        if not breaks:
            raise ValueError(f"{phrases_dir / SCOPE_FILE} needs a [break] section of clause-ending words.")
        self._clause_end_pattern = re.compile(rf"{SENTENCE_END}|{_phrase_pattern(breaks).pattern}")

    @staticmethod
    def _compile_observations(mentions: dict, path: Path) -> list[_ObservationRules]:
        macros, observations = mentions["macros"], mentions["observations"]
        unknown = set(observations) - set(CHEXPERT_OBSERVATIONS)
        if unknown:
            raise ValueError(f"{path} names observations that CheXpert lacks: {sorted(unknown)}.")
        rules = []
        for name, phrases in observations.items():
            if not phrases.get("mention") or not set(phrases) <= set(PHRASE_KINDS):
                raise ValueError(
                    f"{path}: {name} needs a non-empty 'mention' list and may add 'normal' and 'exclude' lists, "
                    f"got keys {sorted(phrases)}."
                )
            compiled = {
                kind: _phrase_pattern(phrases[kind], macros) if phrases.get(kind) else None for kind in PHRASE_KINDS
            }
            rules.append(_ObservationRules(CHEXPERT_OBSERVATIONS.index(name), **compiled))
        return rules

    @staticmethod
    def _read_cues(phrases_dir: Path) -> list[_CueKind]:
        """Every cue, in the order in which the cue alternation tries them (longest first)."""
        directions = {"before": (True, False), "after": (False, True), "both": (True, True), "neutral": (True, True)}
        kinds = []  # neutral cues first, so that they win ties in length, then uncertainty, then negation
        for state, file, sections in (
            (NEUTRAL, SCOPE_FILE, ("neutral",)),
            (UNCERTAIN, UNCERTAINTY_FILE, ("before", "after", "both")),
            (NEGATIVE, NEGATION_FILE, ("before", "after", "both")),
        ):
            phrases = _read_sections(phrases_dir / file)
            for section in sections:
                kinds.extend(
                    _CueKind(re.compile(_expand_phrase(phrase)), state, *directions[section])
                    for phrase in phrases.get(section, [])
                )
        return sorted(kinds, key=lambda kind: len(kind.pattern.pattern), reverse=True)  # stable, as `_alternation`

    def _cue_kind(self, text: str) -> _CueKind:
        """The cue that the alternation matched as `text`: the first, in its order, that matches all of `text`.

        One unnamed alternation and this look-up are several times faster than a named group per cue.
        """
        kind = self._cue_kind_of_text.get(text)
        if kind is None:
            kind = next(kind for kind in self._cue_kinds if kind.pattern.fullmatch(text))
            self._cue_kind_of_text[text] = kind
        return kind

    def label(self, reports: Sequence[str]) -> list[list[int]]:
        """14 labels per report (order of `CHEXPERT_OBSERVATIONS`; 0 blank, 1 positive, 2 negative, 3 uncertain)."""
        if isinstance(reports, str):
            raise ValueError("label() takes a list of reports, not a single string.")
        return [self.label_report(report) for report in reports]

    def label_report(self, report: str) -> list[int]:
        """The 14 labels of one report."""
        if not isinstance(report, str):
            raise ValueError(f"A report must be a string, got {type(report).__name__}: {report!r}.")
        text = report.lower()
        clause_ends = [match.start() for match in self._clause_end_pattern.finditer(text)]
        cues = []
        for match in self._cue_pattern.finditer(text):
            kind = self._cue_kind(match.group())
            cues.append(_Cue(match.start(), match.end(), kind.state, kind.before, kind.after))
        labels = [BLANK] * len(CHEXPERT_OBSERVATIONS)
        for rules in self._rules:
            states = [NEGATIVE for _ in rules.normal.finditer(text)] if rules.normal else []
            excluded = [match.span() for match in rules.exclude.finditer(text)] if rules.exclude else []
            for match in rules.mention.finditer(text):
                if not any(start <= match.start() and match.end() <= end for start, end in excluded):
                    states.append(self._mention_state(match, text, cues, clause_ends))
            labels[rules.index] = max(states, key=STATE_STRENGTH.__getitem__, default=BLANK)
        no_finding = all(labels[index] not in (POSITIVE, UNCERTAIN) for index in PATHOLOGY_INDICES)
        labels[NO_FINDING_INDEX] = POSITIVE if no_finding else BLANK
        return labels

    @staticmethod
    def _mention_state(mention: re.Match, text: str, cues: list[_Cue], clause_ends: list[int]) -> int:
        """NEGATIVE, UNCERTAIN or POSITIVE: the cues that apply to one mention (see the class docstring)."""
        clause = bisect_right(clause_ends, mention.start())
        # A cue that overlaps the mention applies to it whatever its direction.
        applying = [cue.state for cue in cues if cue.start < mention.end() and cue.end > mention.start()]
        before = [cue for cue in cues if cue.end <= mention.start() and bisect_right(clause_ends, cue.start) == clause]
        if before and before[-1].before:
            applying.append(before[-1].state)
        after = [cue for cue in cues if cue.start >= mention.end() and bisect_right(clause_ends, cue.start) == clause]
        if after and after[0].after and len(text[mention.end() : after[0].start].split()) <= POST_CUE_MAX_WORDS:
            applying.append(after[0].state)
        if NEGATIVE in applying:
            return NEGATIVE
        return UNCERTAIN if UNCERTAIN in applying else POSITIVE


# ---------------------------------------------------------------------------------------------------------------------
# CheXbert
# ---------------------------------------------------------------------------------------------------------------------

# stanfordmlgroup/CheXbert `bert_labeler`: dropout on the [CLS] state, then 13 heads over (blank, positive, negative,
# uncertain) and a last one, "No Finding", over (blank, positive). Its class ids are this project's label codes.
CHEXBERT_NUM_CLASSES = 4
CHEXBERT_NO_FINDING_CLASSES = 2
CHEXBERT_DROPOUT = 0.1
CHEXBERT_STATE_DICT_KEY = "model_state_dict"
CHEXBERT_PREFIX = "module."  # the checkpoint was saved from a torch.nn.DataParallel
# Where f1chexbert / RadGraph-style scorers fetch the Stanford checkpoint when no local file is given.
CHEXBERT_HUB_REPO = "StanfordAIMI/RRG_scorers"
CHEXBERT_HUB_FILENAME = "chexbert.pth"
# BERT's head size: infers the number of attention heads, which no weight shape records.
BERT_HEAD_DIM = 64
# Buffers that old transformers versions saved in state dicts and current BertModel no longer stores.
LEGACY_BERT_BUFFERS = ("embeddings.position_ids",)


def build_chexbert_model(config, add_pooling_layer: bool = True):
    """A CheXbert model (random weights) of BertConfig `config`: `bert` (a BertModel) and `linear_heads` (14).

    The class is defined on first use so that importing this module does not import torch.
    """
    from torch import nn
    from transformers import BertModel

    class CheXbertModel(nn.Module):
        """CheXbert's `bert_labeler`: a BertModel and 14 linear heads on its (dropped-out) [CLS] state."""

        def __init__(self, config, add_pooling_layer: bool = True):
            super().__init__()
            # The original loads BertModel with its pooler (unused); the checkpoint holds its weights.
            self.bert = BertModel(config, add_pooling_layer=add_pooling_layer)
            self.dropout = nn.Dropout(CHEXBERT_DROPOUT)
            num_classes = [CHEXBERT_NUM_CLASSES] * (len(CHEXPERT_OBSERVATIONS) - 1) + [CHEXBERT_NO_FINDING_CLASSES]
            self.linear_heads = nn.ModuleList(nn.Linear(config.hidden_size, classes) for classes in num_classes)

        def forward(self, input_ids, attention_mask):
            """One (batch, classes) logit tensor per observation."""
            cls_state = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
            cls_state = self.dropout(cls_state)
            return [head(cls_state) for head in self.linear_heads]

    return CheXbertModel(config, add_pooling_layer=add_pooling_layer)


def load_chexbert_state_dict(path: str | os.PathLike) -> dict:
    """The weights of a Stanford CheXbert checkpoint (`chexbert.pth`), without the DataParallel `module.` prefix.

    The file is read with `weights_only=True`: a checkpoint holding anything but tensors and plain containers is
    refused (a pickle can run arbitrary code).
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CheXbert checkpoint {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} could not be loaded as a weights-only checkpoint ({_unpickling_reason(error)}): it is not a "
            f"PyTorch file, or it holds objects other than tensors, which are not unpickled because that could run "
            f"arbitrary code."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path} could not be read as a PyTorch checkpoint: {error}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(CHEXBERT_STATE_DICT_KEY), dict):
        raise ValueError(
            f"{path} is not a CheXbert checkpoint: expected a dict with a {CHEXBERT_STATE_DICT_KEY!r} dict of "
            f"weights, got {type(checkpoint).__name__}"
            + (f" with keys {sorted(checkpoint)[:10]}." if isinstance(checkpoint, dict) else ".")
        )
    state_dict = {
        key.removeprefix(CHEXBERT_PREFIX): value for key, value in checkpoint[CHEXBERT_STATE_DICT_KEY].items()
    }
    required = ["bert.embeddings.word_embeddings.weight"] + [
        f"linear_heads.{index}.{name}" for index in range(len(CHEXPERT_OBSERVATIONS)) for name in ("weight", "bias")
    ]
    missing = [f"{CHEXBERT_PREFIX}{key}" for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"{path} is not a CheXbert checkpoint: its {CHEXBERT_STATE_DICT_KEY!r} lacks {missing}.")
    return {key: value for key, value in state_dict.items() if key.removeprefix("bert.") not in LEGACY_BERT_BUFFERS}


def _unpickling_reason(error: Exception) -> str:
    """The cause in torch's weights-only refusal, without its advice to load with weights_only=False."""
    message = str(error)
    _, found, reason = message.partition("WeightsUnpickler error:")
    return reason.split("Check the documentation")[0].strip() if found else message


def bert_config_from_state_dict(state_dict: dict):
    """The BertConfig whose BertModel has the shapes of `state_dict`'s `bert.*` weights.

    The number of attention heads is not in any shape: it is hidden_size / 64 (BERT's head size), 12 for BERT-base.
    """
    from transformers import BertConfig

    vocab_size, hidden_size = state_dict["bert.embeddings.word_embeddings.weight"].shape
    if hidden_size % BERT_HEAD_DIM:
        raise ValueError(
            f"Cannot infer the number of attention heads of a hidden size of {hidden_size} (not a multiple of "
            f"{BERT_HEAD_DIM}): pass config=BertConfig(...)."
        )
    layer_keys = [key for key in state_dict if key.startswith("bert.encoder.layer.")]
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=1 + max(int(key.split(".")[3]) for key in layer_keys),
        num_attention_heads=hidden_size // BERT_HEAD_DIM,
        intermediate_size=state_dict["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=state_dict["bert.embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state_dict["bert.embeddings.token_type_embeddings.weight"].shape[0],
    )


def _resolve_checkpoint(checkpoint: str | os.PathLike | None) -> Path:
    """A local checkpoint path, downloading the Stanford one from the Hub when `checkpoint` is None."""
    if checkpoint is not None:
        return Path(checkpoint)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(CHEXBERT_HUB_REPO, CHEXBERT_HUB_FILENAME))
    except Exception as error:  # offline, gated, moved: any failure means the same thing to the user
        raise OSError(
            f"No CheXbert checkpoint given and {CHEXBERT_HUB_FILENAME} could not be fetched from the Hub repository "
            f"{CHEXBERT_HUB_REPO} ({error}). Pass the path of a local chexbert.pth, or use the rule-based labeler."
        ) from error


def _load_tokenizer(tokenizer):
    """A tokenizer object as is; a name or path through AutoTokenizer, with a clear error when it is unavailable."""
    if not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as error:
        raise OSError(
            f"Could not load the CheXbert tokenizer {str(tokenizer)!r} ({error}). CheXbert uses bert-base-uncased's "
            f"vocabulary: without network access, pass a local directory that holds it (tokenizer.save_pretrained) "
            f"or a tokenizer object."
        ) from error


class CheXbertLabeler:
    """CheXbert (Smit et al., EMNLP 2020) on CPU or GPU: 14 CheXpert labels per report.

    Args:
        checkpoint: path of the Stanford `chexbert.pth` (a dict whose `model_state_dict` has `module.bert.*` and
            `module.linear_heads.{0..13}.*`); None fetches it from the Hub (`CHEXBERT_HUB_REPO`).
        tokenizer: tokenizer object, or the name or path of one (CheXbert's is bert-base-uncased's).
        device: where the model runs.
        batch_size: reports per forward pass.
        max_length: reports are truncated to this many tokens, [CLS] and [SEP] included (CheXbert: 512).
        config: the BertConfig of the checkpoint's encoder; by default inferred from its weight shapes.

    The class ids of CheXbert's heads (0 blank, 1 positive, 2 negative, 3 uncertain; "No Finding": 0 blank,
    1 positive) are the project's label codes, so predictions are returned as they are.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        tokenizer="bert-base-uncased",
        device="cpu",
        batch_size: int = 16,
        max_length: int = 512,
        config=None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        path = _resolve_checkpoint(checkpoint)
        state_dict = load_chexbert_state_dict(path)
        config = config or bert_config_from_state_dict(state_dict)
        if not 2 <= max_length <= config.max_position_embeddings:  # room for [CLS] and [SEP]
            raise ValueError(f"max_length must be in [2, {config.max_position_embeddings}], got {max_length}.")
        add_pooling_layer = any(key.startswith("bert.pooler.") for key in state_dict)
        model = build_chexbert_model(config, add_pooling_layer=add_pooling_layer)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:  # missing, unexpected or mis-shaped weights
            raise ValueError(
                f"{path} does not fit a CheXbert model of config {config.to_diff_dict()}: {error}"
            ) from error
        self.model = model.to(device).eval()
        self.tokenizer = _load_tokenizer(tokenizer)
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length

    def label(self, reports: Sequence[str]) -> list[list[int]]:
        """14 labels per report (order of `CHEXPERT_OBSERVATIONS`; 0 blank, 1 positive, 2 negative, 3 uncertain)."""
        import torch

        if isinstance(reports, str):
            raise ValueError("label() takes a list of reports, not a single string.")
        if not reports:
            return []
        for index, report in enumerate(reports):
            if not isinstance(report, str):
                raise ValueError(f"Report {index} must be a string, got {type(report).__name__}: {report!r}.")
        # CheXbert's preprocessing: whitespace, line breaks included, collapsed to single spaces.
        texts = [" ".join(report.split()) for report in reports]
        input_ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        # Batches of similar lengths waste less compute on padding; the labels go back to the input order.
        order = sorted(range(len(texts)), key=lambda index: len(input_ids[index]))
        labels = [None] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch_indices = order[start : start + self.batch_size]
                batch = self.tokenizer.pad({"input_ids": [input_ids[i] for i in batch_indices]}, return_tensors="pt")
                logits = self.model(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
                predictions = torch.stack([head_logits.argmax(dim=-1) for head_logits in logits], dim=1)
                for index, row in zip(batch_indices, predictions.tolist()):
                    labels[index] = row
        return labels
