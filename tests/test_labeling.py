"""The rule-based CheXpert labeler on report sentences, and the CheXbert labeler on a tiny random checkpoint."""

import argparse
import json
import shutil
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, BertTokenizerFast

from configuration_kif import CHEXPERT_OBSERVATIONS
from labeling_kif import PHRASES_DIR, CheXbertLabeler, RuleBasedLabeler, build_chexbert_model


BLANK, POSITIVE, NEGATIVE, UNCERTAIN = 0, 1, 2, 3
NO_FINDING = CHEXPERT_OBSERVATIONS.index("No Finding")


@pytest.fixture(scope="module")
def labeler() -> RuleBasedLabeler:
    return RuleBasedLabeler()


def label_of(labeler: RuleBasedLabeler, report: str, observation: str) -> int:
    return labeler.label([report])[0][CHEXPERT_OBSERVATIONS.index(observation)]


# ---------------------------------------------------------------------------------------------------------------------
# Rule-based labeler
# ---------------------------------------------------------------------------------------------------------------------

# (report, observation, label): for each of the 13 mention-based observations, an affirmed, a negated, an uncertain
# and an unmentioned (blank) case, plus cases that exercise one rule each.
RULE_CASES = [
    ("The cardiomediastinal silhouette is enlarged.", "Enlarged Cardiomediastinum", POSITIVE),
    ("The cardiomediastinal silhouette is normal.", "Enlarged Cardiomediastinum", NEGATIVE),
    ("Mediastinal and hilar contours are unremarkable.", "Enlarged Cardiomediastinum", NEGATIVE),
    ("Possible widening of the mediastinum.", "Enlarged Cardiomediastinum", UNCERTAIN),
    ("The lungs are clear.", "Enlarged Cardiomediastinum", BLANK),
    ("Moderate cardiomegaly.", "Cardiomegaly", POSITIVE),
    ("The heart size is mildly enlarged.", "Cardiomegaly", POSITIVE),
    ("No cardiomegaly.", "Cardiomegaly", NEGATIVE),
    ("Heart size is normal.", "Cardiomegaly", NEGATIVE),
    ("The heart is not enlarged.", "Cardiomegaly", NEGATIVE),
    ("The heart is borderline enlarged.", "Cardiomegaly", UNCERTAIN),  # the cue is inside the mention
    ("Mild cardiomegaly cannot be excluded.", "Cardiomegaly", UNCERTAIN),
    ("Left pectoral pacemaker with leads terminating in the heart.", "Cardiomegaly", BLANK),
    ("Patchy opacity in the right lower lobe.", "Lung Opacity", POSITIVE),
    ("No focal opacity.", "Lung Opacity", NEGATIVE),
    ("Possible left basilar opacity.", "Lung Opacity", UNCERTAIN),
    ("Patchy right lower lung opacity may represent atelectasis.", "Lung Opacity", POSITIVE),  # "may" looks forward
    ("Diffuse soft tissue density over the chest wall.", "Lung Opacity", BLANK),  # look-alike
    ("A 1.5 cm nodule in the right upper lobe.", "Lung Lesion", POSITIVE),  # "1.5" is no sentence end
    ("No pulmonary nodules or masses.", "Lung Lesion", NEGATIVE),
    ("Questionable nodule at the left base.", "Lung Lesion", UNCERTAIN),
    ("Lytic lesion in the humeral head.", "Lung Lesion", BLANK),
    ("Mild pulmonary edema.", "Edema", POSITIVE),
    ("Pulmonary vascular congestion.", "Edema", POSITIVE),
    ("No pulmonary edema.", "Edema", NEGATIVE),
    ("Mild perihilar haziness may reflect early pulmonary edema.", "Edema", UNCERTAIN),
    ("Subcutaneous edema of the chest wall.", "Edema", BLANK),  # look-alike
    ("Right lower lobe consolidation.", "Consolidation", POSITIVE),
    ("There is no focal consolidation.", "Consolidation", NEGATIVE),
    ("Consolidation cannot be excluded.", "Consolidation", UNCERTAIN),
    ("Patchy opacity in the right lower lobe.", "Consolidation", BLANK),
    ("Right lower lobe consolidation, consistent with pneumonia.", "Pneumonia", POSITIVE),
    ("No evidence of pneumonia.", "Pneumonia", NEGATIVE),
    ("Lungs are clear without focal consolidation to suggest pneumonia.", "Pneumonia", NEGATIVE),
    ("Focal left upper lung opacity, concerning for pneumonia.", "Pneumonia", UNCERTAIN),
    ("Pneumonia is not excluded.", "Pneumonia", UNCERTAIN),  # "not excluded" is uncertainty, not negation
    ("Right lower lobe consolidation.", "Pneumonia", BLANK),
    ("Mild bibasilar atelectasis.", "Atelectasis", POSITIVE),
    ("No atelectasis.", "Atelectasis", NEGATIVE),
    ("Patchy opacity may represent atelectasis.", "Atelectasis", UNCERTAIN),
    ("Atelectasis versus pneumonia in the right lower lobe.", "Atelectasis", UNCERTAIN),
    ("Vertebral body collapse at T12.", "Atelectasis", BLANK),  # look-alike
    ("Small left apical pneumothorax.", "Pneumothorax", POSITIVE),
    ("No pneumothorax is seen.", "Pneumothorax", NEGATIVE),
    ("The right pneumothorax has resolved.", "Pneumothorax", NEGATIVE),
    ("A tiny right apical pneumothorax cannot be excluded.", "Pneumothorax", UNCERTAIN),
    ("Moderate cardiomegaly.", "Pneumothorax", BLANK),
    ("There is a small left pleural effusion.", "Pleural Effusion", POSITIVE),
    ("Blunting of the right costophrenic angle.", "Pleural Effusion", POSITIVE),
    ("No pleural effusion.", "Pleural Effusion", NEGATIVE),
    ("The costophrenic angles are sharp.", "Pleural Effusion", NEGATIVE),
    ("Possible small right pleural effusion.", "Pleural Effusion", UNCERTAIN),
    ("Small pericardial effusion.", "Pleural Effusion", BLANK),  # look-alike
    ("Left apical pleural thickening.", "Pleural Other", POSITIVE),
    ("No pleural thickening.", "Pleural Other", NEGATIVE),
    ("Possible pleural plaque on the right.", "Pleural Other", UNCERTAIN),
    ("Small left pleural effusion.", "Pleural Other", BLANK),
    ("Acute fracture of the left seventh rib.", "Fracture", POSITIVE),
    ("No displaced rib fractures.", "Fracture", NEGATIVE),
    ("Questionable fracture of the right clavicle.", "Fracture", UNCERTAIN),
    ("Degenerative changes of the thoracic spine.", "Fracture", BLANK),
    ("An endotracheal tube is in place.", "Support Devices", POSITIVE),
    ("Right IJ catheter tip in the SVC.", "Support Devices", POSITIVE),
    ("The endotracheal tube has been removed.", "Support Devices", NEGATIVE),
    ("Possible retained catheter fragment.", "Support Devices", UNCERTAIN),
    ("Kerley B lines and a thin right pleural line.", "Support Devices", BLANK),  # look-alikes
    # Scope: a list shares its negation; "but" and "there is" start a new clause; pseudo-negations are no cues.
    ("No pleural effusion, pneumothorax, or focal consolidation.", "Consolidation", NEGATIVE),
    ("No pneumothorax, but there is a small left effusion.", "Pleural Effusion", POSITIVE),
    ("No pneumothorax, possible small left effusion.", "Pleural Effusion", UNCERTAIN),  # the nearest cue decides
    ("No change in the small left pleural effusion.", "Pleural Effusion", POSITIVE),
    ("No pneumothorax, no change in the small left pleural effusion.", "Pleural Effusion", POSITIVE),
    ("Pleural effusion is present and the pneumothorax has resolved.", "Pleural Effusion", POSITIVE),
    ("Pleural effusion is present and the pneumothorax has resolved.", "Pneumothorax", NEGATIVE),
    # Aggregation over mentions: positive beats uncertain beats negative.
    ("No pneumothorax on the left. Small right apical pneumothorax.", "Pneumothorax", POSITIVE),
    ("Possible atelectasis at the left base. No atelectasis on the right.", "Atelectasis", UNCERTAIN),
    # Case and the processor's tokenised form.
    ("THERE IS NO PLEURAL EFFUSION.", "Pleural Effusion", NEGATIVE),
    ("there is a small left pleural effusion . no pneumothorax .", "Pneumothorax", NEGATIVE),
]


@pytest.mark.parametrize("report, observation, expected", RULE_CASES)
def test_rule_based_labels(labeler, report, observation, expected):
    assert label_of(labeler, report, observation) == expected


def test_rule_cases_cover_every_observation_and_state():
    covered = {(observation, state) for _, observation, state in RULE_CASES}
    mentioned = [name for name in CHEXPERT_OBSERVATIONS if name != "No Finding"]
    assert {(name, state) for name in mentioned for state in (BLANK, POSITIVE, NEGATIVE, UNCERTAIN)} <= covered


@pytest.mark.parametrize(
    "report, no_finding",
    [
        ("No acute cardiopulmonary process.", POSITIVE),
        ("Heart size is normal. No pleural effusion or pneumothorax.", POSITIVE),  # negatives only
        ("An endotracheal tube is in place. The lungs are clear.", POSITIVE),  # support devices do not count
        ("", POSITIVE),  # nothing mentioned
        ("Small left pleural effusion.", BLANK),
        ("Possible small left pleural effusion.", BLANK),  # uncertain counts as a finding
        ("Acute fracture of the left seventh rib.", BLANK),
    ],
)
def test_no_finding(labeler, report, no_finding):
    assert labeler.label([report])[0][NO_FINDING] == no_finding


def test_full_report(labeler):
    report = (
        "PA and lateral views of the chest. Moderate cardiomegaly. Left chest wall pacemaker with leads in the right "
        "atrium and ventricle. Mild pulmonary edema. Small bilateral pleural effusions. No pneumothorax. Bibasilar "
        "opacities may represent atelectasis, although pneumonia cannot be excluded."
    )
    expected = dict.fromkeys(CHEXPERT_OBSERVATIONS, BLANK) | {
        "Cardiomegaly": POSITIVE,
        "Lung Opacity": POSITIVE,
        "Edema": POSITIVE,
        "Pneumonia": UNCERTAIN,
        "Atelectasis": UNCERTAIN,
        "Pneumothorax": NEGATIVE,
        "Pleural Effusion": POSITIVE,
        "Support Devices": POSITIVE,
    }
    assert labeler.label([report]) == [list(expected.values())]


def test_many_reports(labeler):
    # Speed is measured in bench/, not asserted here: this checks that a large batch labels each report alike.
    repeats = 4000 // len(RULE_CASES) + 1
    reports = [case[0] for case in RULE_CASES] * repeats
    labels = labeler.label(reports)
    assert len(labels) == len(reports) > 4000
    assert labels[: len(RULE_CASES)] * repeats == labels
    assert all(len(row) == len(CHEXPERT_OBSERVATIONS) and set(row) <= {0, 1, 2, 3} for row in labels)


def test_rule_based_rejects_bad_input(labeler):
    with pytest.raises(ValueError, match="list of reports, not a single string"):
        labeler.label("No pleural effusion.")
    with pytest.raises(ValueError, match="must be a string, got NoneType"):
        labeler.label(["No pleural effusion.", None])


def test_phrase_files_are_the_rules(tmp_path):
    phrases = tmp_path / "phrases"
    shutil.copytree(PHRASES_DIR, phrases)
    mentions = json.loads((phrases / "mentions.json").read_text())
    mentions["observations"]["Fracture"]["mention"].append("broken bones?")
    (phrases / "mentions.json").write_text(json.dumps(mentions))
    assert label_of(RuleBasedLabeler(phrases), "No broken bones.", "Fracture") == NEGATIVE

    mentions["observations"]["Fracture"]["exclusions"] = ["old fractures?"]  # a misspelt list name
    (phrases / "mentions.json").write_text(json.dumps(mentions))
    with pytest.raises(ValueError, match=r"Fracture needs a non-empty 'mention' list.*'exclusions'"):
        RuleBasedLabeler(phrases)

    del mentions["observations"]["Fracture"]["exclusions"]
    mentions["observations"]["Hernia"] = {"mention": ["hernia"]}
    (phrases / "mentions.json").write_text(json.dumps(mentions))
    with pytest.raises(ValueError, match=r"observations that CheXpert lacks: \['Hernia'\]"):
        RuleBasedLabeler(phrases)


def test_phrase_file_without_section_is_refused(tmp_path):
    phrases = tmp_path / "phrases"
    shutil.copytree(PHRASES_DIR, phrases)
    (phrases / "negation.txt").write_text("# cues\nno\n[before]\nwithout\n")
    with pytest.raises(ValueError, match=r"negation.txt:2: phrase 'no' comes before any \[section\]"):
        RuleBasedLabeler(phrases)


# ---------------------------------------------------------------------------------------------------------------------
# CheXbert labeler on a tiny random model
# ---------------------------------------------------------------------------------------------------------------------

TINY_WORDS = (
    "the heart size is normal lungs are clear no there a small left right pleural effusion pneumothorax mild "
    "moderate cardiomegaly pacemaker present tube opacity may represent atelectasis edema . ,"
).split()
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
TINY_MAX_POSITIONS = 40
# Larger than BERT's 0.02 so that the random model's labels differ between reports.
TINY_INITIALIZER_RANGE = 0.5
REPORTS = [
    "The heart size is normal. The lungs are clear.",
    "There is a small left pleural effusion. No pneumothorax.",
    "Moderate cardiomegaly. A pacemaker is present.",
    "",
    "Right opacity may represent atelectasis, mild edema.",
    "the heart is normal . " * 30,  # longer than max_length: truncated
    "no pneumothorax",
]


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    """A WordPiece tokenizer of a few report words, saved as a BertTokenizerFast."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: index for index, token in enumerate(special + TINY_WORDS)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    wrapped = BertTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    wrapped.save_pretrained(directory)
    return directory


def tiny_config(**overrides) -> BertConfig:
    settings = dict(
        vocab_size=5 + len(TINY_WORDS), max_position_embeddings=TINY_MAX_POSITIONS,
        initializer_range=TINY_INITIALIZER_RANGE, **TINY_BERT,
    )  # fmt: skip
    return BertConfig(**(settings | overrides))


def save_stanford_checkpoint(path, config: BertConfig, **extra) -> dict:
    """A random CheXbert in the Stanford format (DataParallel `module.` keys); returns its weights."""
    torch.manual_seed(0)
    model = build_chexbert_model(config)
    state_dict = {f"module.{key}": value for key, value in model.state_dict().items()}
    torch.save({"epoch": 7, "model_state_dict": state_dict, **extra}, path)
    return model.state_dict()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("chexbert") / "chexbert.pth"
    return path, save_stanford_checkpoint(path, tiny_config())


@pytest.fixture(scope="module")
def chexbert(tiny_checkpoint, tiny_tokenizer_dir) -> CheXbertLabeler:
    path, _ = tiny_checkpoint
    return CheXbertLabeler(path, tokenizer=str(tiny_tokenizer_dir), batch_size=3, max_length=16, config=tiny_config())


def test_chexbert_output_codes(chexbert):
    labels = chexbert.label(REPORTS)
    assert len(labels) == len(REPORTS) and all(len(row) == len(CHEXPERT_OBSERVATIONS) for row in labels)
    assert {code for row in labels for code in row[:NO_FINDING]} <= {0, 1, 2, 3}
    assert {row[NO_FINDING] for row in labels} <= {0, 1}  # the "No Finding" head has 2 classes
    assert len({tuple(row) for row in labels}) > 1  # the labels depend on the report


def test_chexbert_batching_and_determinism(chexbert):
    batched = chexbert.label(REPORTS)
    assert [chexbert.label([report])[0] for report in REPORTS] == batched
    assert chexbert.label(REPORTS) == batched
    assert chexbert.label(REPORTS[::-1]) == batched[::-1]
    assert chexbert.label([]) == []


def test_chexbert_equals_manual_forward(chexbert, tiny_checkpoint, tiny_tokenizer_dir):
    _, state_dict = tiny_checkpoint
    bert = BertModel(tiny_config()).eval()
    bert.load_state_dict(
        {key.removeprefix("bert."): value for key, value in state_dict.items() if key.startswith("bert.")}
    )
    tokenizer = BertTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    expected = []
    with torch.no_grad():
        for report in REPORTS:
            inputs = tokenizer(" ".join(report.split()), truncation=True, max_length=16, return_tensors="pt")
            cls_state = bert(**inputs).last_hidden_state[0, 0]
            heads = range(len(CHEXPERT_OBSERVATIONS))
            logits = [
                state_dict[f"linear_heads.{i}.weight"] @ cls_state + state_dict[f"linear_heads.{i}.bias"]
                for i in heads
            ]
            expected.append([int(head_logits.argmax()) for head_logits in logits])
    assert chexbert.label(REPORTS) == expected


def test_chexbert_infers_config_from_weights(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "chexbert.pth"
    config = tiny_config(hidden_size=64, num_attention_heads=1, num_hidden_layers=3, intermediate_size=50)
    save_stanford_checkpoint(path, config)
    labeler = CheXbertLabeler(path, tokenizer=str(tiny_tokenizer_dir), max_length=16)
    inferred = labeler.model.bert.config
    assert (inferred.hidden_size, inferred.num_hidden_layers, inferred.num_attention_heads) == (64, 3, 1)
    assert (inferred.intermediate_size, inferred.vocab_size, inferred.max_position_embeddings) == (
        50,
        5 + len(TINY_WORDS),
        40,
    )
    assert len(labeler.label(REPORTS)) == len(REPORTS)


def test_chexbert_without_config_needs_bert_head_size(tiny_checkpoint, tiny_tokenizer_dir):
    path, _ = tiny_checkpoint  # hidden size 32: not a multiple of BERT's 64-wide heads
    with pytest.raises(ValueError, match="hidden size of 32.*pass config="):
        CheXbertLabeler(path, tokenizer=str(tiny_tokenizer_dir))


def test_chexbert_refuses_pickled_objects(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "chexbert_with_args.pth"
    save_stanford_checkpoint(path, tiny_config(), args=argparse.Namespace(lr=1e-5))
    with pytest.raises(ValueError, match=rf"{path.name} could not be loaded as a weights-only checkpoint.*Namespace"):
        CheXbertLabeler(path, tokenizer=str(tiny_tokenizer_dir), config=tiny_config())


def test_chexbert_refuses_other_checkpoints(tmp_path, tiny_checkpoint, tiny_tokenizer_dir):
    _, state_dict = tiny_checkpoint
    cases = {
        "tensor.pth": (torch.zeros(3), "not a CheXbert checkpoint: expected a dict.*got Tensor"),
        "plain.pth": ({"state_dict": state_dict}, r"expected a dict with a 'model_state_dict'.*keys \['state_dict'\]"),
        "headless.pth": (
            {
                "model_state_dict": {
                    f"module.{k}": v for k, v in state_dict.items() if not k.startswith("linear_heads.13")
                }
            },
            r"lacks \['module.linear_heads.13.weight', 'module.linear_heads.13.bias'\]",
        ),
    }
    for name, (content, match) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError, match=match):
            CheXbertLabeler(tmp_path / name, tokenizer=str(tiny_tokenizer_dir), config=tiny_config())
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth could not be loaded.*not a PyTorch file"):
        CheXbertLabeler(tmp_path / "garbage.pth", tokenizer=str(tiny_tokenizer_dir), config=tiny_config())
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        CheXbertLabeler(tmp_path / "missing.pth", tokenizer=str(tiny_tokenizer_dir))


def test_chexbert_mismatched_config(tiny_checkpoint, tiny_tokenizer_dir):
    path, _ = tiny_checkpoint
    with pytest.raises(ValueError, match="does not fit a CheXbert model"):
        CheXbertLabeler(
            path, tokenizer=str(tiny_tokenizer_dir), max_length=16, config=tiny_config(intermediate_size=38)
        )


def test_chexbert_missing_tokenizer(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    with pytest.raises(OSError, match="Could not load the CheXbert tokenizer.*bert-base-uncased's vocabulary"):
        CheXbertLabeler(path, tokenizer=str(tmp_path / "no_tokenizer"), max_length=16, config=tiny_config())


def test_chexbert_bad_arguments(chexbert, tiny_checkpoint, tiny_tokenizer_dir):
    path, _ = tiny_checkpoint
    with pytest.raises(ValueError, match=r"max_length must be in \[2, 40\], got 512"):
        CheXbertLabeler(path, tokenizer=str(tiny_tokenizer_dir), config=tiny_config())
    with pytest.raises(ValueError, match="list of reports, not a single string"):
        chexbert.label("No pleural effusion.")
    with pytest.raises(ValueError, match="Report 1 must be a string"):
        chexbert.label(["No pleural effusion.", 3])


def test_chexbert_default_checkpoint_comes_from_the_hub(monkeypatch, tiny_checkpoint, tiny_tokenizer_dir):
    import huggingface_hub

    path, _ = tiny_checkpoint
    requests = []
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda repo, name: requests.append((repo, name)) or str(path)
    )
    CheXbertLabeler(tokenizer=str(tiny_tokenizer_dir), max_length=16, config=tiny_config())
    assert requests == [("StanfordAIMI/RRG_scorers", "chexbert.pth")]

    def offline(repo, name):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(OSError, match="could not be fetched from the Hub.*Pass the path of a local chexbert.pth"):
        CheXbertLabeler(tokenizer=str(tiny_tokenizer_dir), config=tiny_config())


def test_labeling_module_loads_no_model_code_at_import():
    # configuration_kif (the observation names) brings transformers' configuration code; labeling_kif must add no
    # model, tokenizer or Hub code until a CheXbertLabeler is built.
    code = (
        "import sys, configuration_kif; before = set(sys.modules); import labeling_kif; "
        "print(sorted(name for name in set(sys.modules) - before if name.split('.')[0] in "
        "('torch', 'transformers', 'tokenizers', 'huggingface_hub')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PHRASES_DIR.parent, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
