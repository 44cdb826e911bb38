"""Initialisation from pretrained backbones (pretrained_init.py), offline, from tiny local checkpoints: a BERT LM and
its tokenizer, a transformers ResNet and a torchvision ResNet state_dict."""

import huggingface_hub
import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from transformers import BertConfig, BertLMHeadModel, BertTokenizer, ResNetConfig, ResNetModel

from configuration_kif import FINDING_STATES, KifConfig
from kif_testing import TINY_DIR
from modeling_kif import KifForConditionalGeneration
from pretrained_init import init_from_pretrained_backbones, load_bert_into_decoder, load_report_tokenizer, main
from processing_kif import KifProcessor


# The tiny processor's vocabulary without the 5 prompt tokens that prepare_report_tokenizer appends.
NUM_PROMPT_TOKENS = 5


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def config() -> KifConfig:
    # Node embeddings are initialised from word embeddings, so the knowledge width is the decoder's.
    config = KifConfig.from_pretrained(TINY_DIR)
    config.knowledge_hidden_size = config.text_config.hidden_size
    return config


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, config):
    """A tiny BERT LM with token types (like bert-base-uncased) and its plain WordPiece tokenizer."""
    directory = tmp_path_factory.mktemp("bert")
    text = config.text_config
    vocab_size = text.vocab_size - NUM_PROMPT_TOKENS
    bert_config = BertConfig(
        vocab_size=vocab_size, hidden_size=text.hidden_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, intermediate_size=text.intermediate_size,
        max_position_embeddings=text.max_position_embeddings,
    )  # fmt: skip
    torch.manual_seed(1)
    BertLMHeadModel(bert_config).save_pretrained(directory)
    tiny_vocab = KifProcessor.from_pretrained(TINY_DIR).tokenizer.get_vocab()
    BertTokenizer(vocab={token: index for token, index in tiny_vocab.items() if index < vocab_size}).save_pretrained(
        directory
    )
    return directory


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory, config):
    directory = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(2)
    ResNetModel(config.vision_config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def initialised(config, bert_dir, resnet_dir):
    """(model before init, model after init) with the same seed."""
    torch.manual_seed(0)
    before = KifForConditionalGeneration(config)
    torch.manual_seed(0)
    model = KifForConditionalGeneration(config)
    init_from_pretrained_backbones(model, str(bert_dir), str(resnet_dir), local_files_only=True)
    return before, model


def test_decoder_holds_bert_weights(initialised, bert_dir):
    _, model = initialised
    bert = BertLMHeadModel.from_pretrained(bert_dir).state_dict()
    decoder = model.text_decoder.state_dict()
    for key in ("bert.encoder.layer.1.attention.self.value.weight", "bert.encoder.layer.0.output.LayerNorm.bias",
                "bert.embeddings.LayerNorm.weight", "cls.predictions.transform.dense.weight"):  # fmt: skip
        assert torch.equal(decoder[key], bert[key]), key
    num_pretrained = bert["bert.embeddings.word_embeddings.weight"].shape[0]
    word_embeddings = decoder["bert.embeddings.word_embeddings.weight"]
    assert torch.equal(word_embeddings[:num_pretrained], bert["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(decoder["cls.predictions.bias"][:num_pretrained], bert["cls.predictions.bias"])
    # BERT's token-type row 0 is folded into the positions: the input embeddings are BERT's exactly.
    torch.testing.assert_close(
        decoder["bert.embeddings.position_embeddings.weight"],
        bert["bert.embeddings.position_embeddings.weight"] + bert["bert.embeddings.token_type_embeddings.weight"][0],
    )


def test_decoder_input_embeddings_equal_berts(initialised, bert_dir):
    _, model = initialised
    bert = BertLMHeadModel.from_pretrained(bert_dir).eval()
    input_ids = torch.randint(0, bert.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            model.text_decoder.eval().bert.embeddings(input_ids), bert.bert.embeddings(input_ids)
        )


def test_added_tokens_start_from_cls_and_state_words(initialised, bert_dir):
    _, model = initialised
    tokenizer = load_report_tokenizer(str(bert_dir), local_files_only=True)
    embeddings = model.get_input_embeddings().weight
    bias = model.text_decoder.cls.predictions.bias
    start = model.config.text_config.bos_token_id
    assert torch.equal(embeddings[start], embeddings[tokenizer.cls_token_id])
    assert torch.equal(bias[start], bias[tokenizer.cls_token_id])
    for token_id, state in zip(model.config.state_token_ids, FINDING_STATES):
        pieces = tokenizer(state, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(embeddings[token_id], embeddings[pieces].mean(dim=0))
        torch.testing.assert_close(bias[token_id], bias[pieces].mean(dim=0))
    assert torch.equal(model.text_decoder.cls.predictions.decoder.weight, embeddings)  # still tied


def test_cross_attention_keeps_its_initialisation(initialised):
    before, model = initialised
    fresh = {key: value for key, value in before.text_decoder.state_dict().items() if "crossattention" in key}
    after = model.text_decoder.state_dict()
    assert fresh and all(torch.equal(after[key], value) for key, value in fresh.items())


def test_new_decoder_keys_are_exactly_the_cross_attention(config, bert_dir):
    decoder = KifForConditionalGeneration(config).text_decoder
    tokenizer = load_report_tokenizer(str(bert_dir), local_files_only=True)
    bert = BertLMHeadModel.from_pretrained(bert_dir)
    fresh = load_bert_into_decoder(decoder, bert, {config.text_config.bos_token_id: [tokenizer.cls_token_id]})
    assert fresh and all(".crossattention." in key for key in fresh)
    assert len(fresh) == config.text_config.num_hidden_layers * 10  # q, k, v, dense, LayerNorm: weight and bias


def test_knowledge_nodes_are_word_piece_means(initialised, bert_dir):
    _, model = initialised
    tokenizer = load_report_tokenizer(str(bert_dir), local_files_only=True)
    embeddings = model.get_input_embeddings().weight
    for node, name in enumerate(model.config.knowledge_node_names):
        pieces = tokenizer(name, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(
            model.knowledge_encoder.node_embeddings.weight[node], embeddings[pieces].mean(dim=0)
        )


def test_vision_model_holds_the_resnet_checkpoint(initialised, resnet_dir):
    _, model = initialised
    resnet = ResNetModel.from_pretrained(resnet_dir).state_dict()
    vision = model.vision_model.state_dict()
    assert vision.keys() == resnet.keys()
    assert all(torch.equal(vision[key], resnet[key]) for key in resnet)


def test_torchvision_state_dict_file_initialises_the_vision_model(tmp_path, config, bert_dir):
    torchvision_resnet = ResNet(Bottleneck, [1, 1, 1, 1]).eval()
    path = tmp_path / "resnet.pth"
    torch.save(torchvision_resnet.state_dict(), path)
    wide_config = KifConfig.from_dict(config.to_dict())
    wide_config.vision_config = ResNetConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck"
    )
    model = KifForConditionalGeneration(wide_config).eval()
    init_from_pretrained_backbones(model, str(bert_dir), str(path), local_files_only=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = nn.Sequential(*list(torchvision_resnet.children())[:-2])(images)
        torch.testing.assert_close(model.vision_model(images).last_hidden_state, expected)


def test_resnet_with_another_architecture_is_refused(tmp_path, config, bert_dir):
    other = ResNetConfig(**{**config.vision_config.to_dict(), "downsample_in_bottleneck": True})
    ResNetModel(other).save_pretrained(tmp_path / "resnet")
    model = KifForConditionalGeneration(config)
    with pytest.raises(ValueError, match="downsample_in_bottleneck: True vs False"):
        init_from_pretrained_backbones(model, str(bert_dir), str(tmp_path / "resnet"), local_files_only=True)


def test_tokenizer_without_prompt_tokens_is_refused(config, bert_dir, resnet_dir):
    model = KifForConditionalGeneration(config)
    plain = BertTokenizer.from_pretrained(bert_dir)
    with pytest.raises(ValueError, match="prepare_report_tokenizer"):
        init_from_pretrained_backbones(model, str(bert_dir), str(resnet_dir), tokenizer=plain, local_files_only=True)


def test_missing_checkpoints_give_a_clear_message_offline(tmp_path, config, bert_dir):
    model = KifForConditionalGeneration(config)
    for missing in (str(tmp_path / "no-such-model"), "no-such-org/bert"):
        with pytest.raises(OSError, match=f"Could not load the tokenizer '{missing}'"):
            init_from_pretrained_backbones(model, missing, missing, local_files_only=True)
    with pytest.raises(OSError, match="Could not load the vision model .*hf download"):
        init_from_pretrained_backbones(model, str(bert_dir), "no-such-org/resnet", local_files_only=True)


def test_command_line_saves_an_initialised_model_and_processor(tmp_path, config, bert_dir, resnet_dir):
    config.save_pretrained(tmp_path / "config")
    output_dir = main([
        str(tmp_path / "out"), "--text_model", str(bert_dir), "--vision_model", str(resnet_dir),
        "--config", str(tmp_path / "config"), "--local_files_only",
    ])  # fmt: skip
    model = KifForConditionalGeneration.from_pretrained(output_dir)
    processor = KifProcessor.from_pretrained(output_dir)
    bert = BertLMHeadModel.from_pretrained(bert_dir).state_dict()
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(model.text_decoder.state_dict()[key], bert[key])
    assert processor.state_token_ids == model.config.state_token_ids
    assert processor.tokenizer.bos_token_id == model.config.text_config.bos_token_id
