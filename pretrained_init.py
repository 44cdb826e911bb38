"""Initialise KIF-ISD from pretrained backbones, as the original did: bert-base-uncased for the text decoder and an
ImageNet ResNet-101 for the image encoder.

    python pretrained_init.py outputs/kif-init                                    # from the Hub (or its cache)
    python pretrained_init.py outputs/kif-init --text_model ./bert-base-uncased \
        --vision_model ./resnet101-63fe2227.pth --local_files_only                # from local files

builds the full-size model (or `--config`) and a processor whose tokenizer is the text model's plus the prompt tokens
`[DEC] [BLA] [POS] [NEG] [UNC]`, loads the pretrained weights and saves both (`save_pretrained`).

What is initialised how:

- Text decoder (BLIP's BERT decoder): every BERT tensor of the same name. BERT adds its token-type embedding 0 to
  every token; the BLIP decoder has no token types, so that row is folded into the position embeddings (the decoder's
  input embeddings then equal BERT's exactly). Cross-attention has no BERT counterpart and keeps its fresh
  initialisation. Added tokens: `[DEC]` starts every sequence, so it takes the embedding (and output bias) of BERT's
  sequence start `[CLS]`; each state token takes the mean of the word pieces of its state's name ("blank",
  "positive", "negative", "uncertain"); any other added token the mean of all pretrained rows.
- Knowledge nodes: the mean of the word pieces of each node's name, in the decoder's new word table.
- Image encoder: a transformers `ResNetModel` checkpoint (Hub id such as `microsoft/resnet-101`, or a local directory)
  or a torchvision ResNet state_dict file (`.pth`), whose names are mapped as in `convert_original_checkpoint.py`.

The rest (fusion, poke and memory transformers, classifier, disease-word embeddings) keeps its initialisation.
"""

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertLMHeadModel, ResNetModel
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel

from configuration_kif import FINDING_STATES, KifConfig
from convert_original_checkpoint import convert_torchvision_resnet, load_config, load_state_dict_file
from modeling_kif import KifForConditionalGeneration
from processing_kif import KifImageProcessor, KifProcessor, prepare_report_tokenizer


logger = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "bert-base-uncased"
DEFAULT_VISION_MODEL = "microsoft/resnet-101"
TOKEN_TYPE_KEY = "bert.embeddings.token_type_embeddings.weight"
POSITION_KEY = "bert.embeddings.position_embeddings.weight"
# Decoder tensors with one row per vocabulary entry: pretrained rows are copied, added-token rows initialised.
VOCABULARY_KEYS = (
    "bert.embeddings.word_embeddings.weight",
    "cls.predictions.bias",
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
)
# ResNet settings that change the computation; a checkpoint must agree with the model on all of them.
RESNET_ARCHITECTURE = (
    "num_channels", "embedding_size", "hidden_sizes", "depths", "layer_type", "hidden_act",
    "downsample_in_first_stage", "downsample_in_bottleneck",
)  # fmt: skip


def _from_pretrained(load, name: str, what: str, local_files_only: bool):
    """`load(name, local_files_only=...)`, with a message that says where the files were looked for."""
    try:
        return load(name, local_files_only=local_files_only)
    except OSError as error:
        where = "the local Hugging Face cache (local_files_only)" if local_files_only else "the cache or the Hub"
        raise OSError(
            f"Could not load the {what} {name!r}: it is not a local directory of saved files and was not found in "
            f"{where}. Download it where the Hub is reachable (`hf download {name}`) or pass a local directory."
        ) from error


# ---------------------------------------------------------------------------------------------------------------------
# Text decoder
# ---------------------------------------------------------------------------------------------------------------------
def check_tokenizer_matches(tokenizer, config: KifConfig) -> None:
    """The decoder's vocabulary and prompt token ids are fixed by the config; the tokenizer must produce them."""
    start_id = tokenizer.convert_tokens_to_ids(config.decoder_start_token)
    state_ids = tokenizer.convert_tokens_to_ids(list(config.state_tokens))
    expected = (config.text_config.vocab_size, config.text_config.bos_token_id, list(config.state_token_ids))
    if (len(tokenizer), start_id, state_ids) != expected:
        raise ValueError(
            f"The tokenizer ({len(tokenizer)} tokens, {config.decoder_start_token} = {start_id}, state tokens = "
            f"{state_ids}) does not match the config (vocab_size {expected[0]}, bos_token_id {expected[1]}, "
            f"state_token_ids {expected[2]}): add the prompt tokens with `prepare_report_tokenizer`."
        )


def added_token_sources(tokenizer, config: KifConfig) -> dict[int, list[int]]:
    """Pretrained rows whose mean initialises each added token (see the module docstring)."""
    sources = {tokenizer.convert_tokens_to_ids(config.decoder_start_token): [tokenizer.cls_token_id]}
    for token, state in zip(config.state_tokens, FINDING_STATES):
        sources[tokenizer.convert_tokens_to_ids(token)] = tokenizer(state, add_special_tokens=False)["input_ids"]
    return sources


@torch.no_grad()
def load_bert_into_decoder(
    decoder: BlipTextLMHeadModel, bert: BertLMHeadModel, token_sources: dict[int, list[int]], not_pretrained=()
) -> list[str]:
    """Copy a BERT LM's weights into BLIP's text decoder and initialise the added tokens' rows.

    Args:
        decoder: The decoder to fill (its vocabulary extends BERT's by the added tokens).
        bert: The pretrained BERT (`bert.*`, `cls.predictions.*`).
        token_sources: For each added token id, the pretrained ids whose mean initialises its rows.
        not_pretrained: BERT keys that its checkpoint lacked (initialised at random when it was loaded).

    Returns:
        The decoder keys that have no pretrained counterpart and keep their initialisation (cross-attention).
    """
    not_pretrained = set(not_pretrained)
    source = {key: value for key, value in bert.state_dict().items() if key not in not_pretrained}
    target = decoder.state_dict()
    if TOKEN_TYPE_KEY in source and POSITION_KEY in source:
        source[POSITION_KEY] = source[POSITION_KEY] + source[TOKEN_TYPE_KEY][0]
    fresh = []
    for key, tensor in target.items():
        if key not in source:
            fresh.append(key)
        elif key in VOCABULARY_KEYS:
            copy_vocabulary_rows(tensor, source[key], token_sources, key)
        elif tensor.shape != source[key].shape:
            raise ValueError(
                f"The text model's {key} is {tuple(source[key].shape)} but the decoder's is {tuple(tensor.shape)}: "
                "the config's text_config must have the text model's sizes."
            )
        else:
            tensor.copy_(source[key])
    return fresh


def copy_vocabulary_rows(target: torch.Tensor, source: torch.Tensor, token_sources: dict[int, list[int]], key: str):
    """Pretrained rows as they are; each added row the mean of its source rows (or of all pretrained rows)."""
    pretrained = source.shape[0]
    if target.shape[0] < pretrained or target.shape[1:] != source.shape[1:]:
        raise ValueError(
            f"The text model's {key} is {tuple(source.shape)}; the decoder's {tuple(target.shape)} cannot extend it."
        )
    target[:pretrained] = source
    for token_id in range(pretrained, target.shape[0]):
        rows = token_sources.get(token_id, range(pretrained))
        target[token_id] = source[list(rows)].mean(dim=0)


def init_text_decoder(model: KifForConditionalGeneration, text_model: str, tokenizer, local_files_only: bool) -> None:
    load_bert = partial(BertLMHeadModel.from_pretrained, output_loading_info=True, is_decoder=True)
    bert, loading_info = _from_pretrained(load_bert, text_model, "text model", local_files_only)
    fresh = load_bert_into_decoder(
        model.text_decoder, bert, added_token_sources(tokenizer, model.config), loading_info["missing_keys"]
    )
    logger.info(
        "Text decoder initialised from %s; %d tensors have no pretrained counterpart and keep their initialisation: %s",
        text_model,
        len(fresh),
        ", ".join(fresh),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Image encoder
# ---------------------------------------------------------------------------------------------------------------------
def check_resnet_architecture(pretrained: ResNetModel, model: ResNetModel, name: str) -> None:
    differences = {
        field: (getattr(pretrained.config, field), getattr(model.config, field))
        for field in RESNET_ARCHITECTURE
        if getattr(pretrained.config, field) != getattr(model.config, field)
    }
    if differences:
        details = ", ".join(f"{field}: {theirs} vs {ours}" for field, (theirs, ours) in differences.items())
        raise ValueError(f"The vision model {name!r} differs from the config's vision_config ({details}).")


@torch.no_grad()
def init_vision_model(model: KifForConditionalGeneration, vision_model: str, local_files_only: bool) -> None:
    """Load a torchvision ResNet state_dict file or a transformers ResNet checkpoint into `model.vision_model`."""
    if Path(vision_model).is_file():
        weights = convert_torchvision_resnet(load_state_dict_file(vision_model))
    else:
        pretrained = _from_pretrained(ResNetModel.from_pretrained, vision_model, "vision model", local_files_only)
        check_resnet_architecture(pretrained, model.vision_model, vision_model)
        weights = pretrained.state_dict()
    try:
        model.vision_model.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(f"The weights of {vision_model} do not fit the config's vision_config: {error}") from error
    logger.info("Image encoder initialised from %s", vision_model)


# ---------------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------------
def load_report_tokenizer(text_model: str, local_files_only: bool = False):
    """The text model's tokenizer with the prompt tokens added."""
    # AutoTokenizer, not BertTokenizer: in transformers 5, BertTokenizer.from_pretrained of a Hub id whose files cannot
    # be found returns an empty-vocabulary tokenizer instead of raising.
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, text_model, "tokenizer", local_files_only)
    return prepare_report_tokenizer(tokenizer)


def init_from_pretrained_backbones(
    model: KifForConditionalGeneration,
    text_model: str = DEFAULT_TEXT_MODEL,
    vision_model: str = DEFAULT_VISION_MODEL,
    tokenizer=None,
    local_files_only: bool = False,
) -> KifForConditionalGeneration:
    """Load pretrained BERT and ResNet weights into a constructed model (after construction: `post_init` would
    overwrite anything loaded earlier), then initialise the knowledge nodes from the new word embeddings.

    Args:
        model: The model to initialise, in place.
        text_model: Hub id or directory of a BERT checkpoint (`BertModel`, `BertLMHeadModel`, `BertForPreTraining`).
        vision_model: Hub id or directory of a transformers ResNet checkpoint, or a torchvision ResNet `.pth` file.
        tokenizer: The report tokenizer (the text model's plus the prompt tokens); loaded from `text_model` if None.
        local_files_only: Never reach the Hub; use local directories and the cache only.

    Returns:
        `model`.
    """
    tokenizer = tokenizer or load_report_tokenizer(text_model, local_files_only)
    check_tokenizer_matches(tokenizer, model.config)
    init_text_decoder(model, text_model, tokenizer, local_files_only)
    init_vision_model(model, vision_model, local_files_only)
    model.init_knowledge_from_word_embeddings(tokenizer)
    return model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="Where to save the initialised model and its processor.")
    parser.add_argument("--text_model", default=DEFAULT_TEXT_MODEL, help="BERT checkpoint: Hub id or directory.")
    parser.add_argument(
        "--vision_model", default=DEFAULT_VISION_MODEL, help="ResNet: Hub id, directory or torchvision .pth file."
    )
    parser.add_argument("--config", help="Config directory or JSON file (default: the full-size KifConfig()).")
    parser.add_argument("--local_files_only", action="store_true", help="Never reach the Hub.")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = load_config(args.config)
    tokenizer = load_report_tokenizer(args.text_model, args.local_files_only)
    processor = KifProcessor(KifImageProcessor(), tokenizer, num_observations=config.num_observations)
    model = KifForConditionalGeneration(config)
    init_from_pretrained_backbones(model, args.text_model, args.vision_model, tokenizer, args.local_files_only)
    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    logger.info("Saved the initialised model and processor to %s", output_dir)
    return output_dir


if __name__ == "__main__":
    main(sys.argv[1:])
