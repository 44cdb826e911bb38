"""Conversion of original KIF-ISD / PromptMRG checkpoints (convert_original_checkpoint.py).

The original layout is produced here independently of the converter: `original_layout` writes a port model's tensors
under the original code's names (the inverse mapping), adds the never-used modules, the recomputed buffers and the
knowledge-node word table, and the tests check that conversion puts every tensor back where it came from."""

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from transformers import BertTokenizer, ResNetConfig, ResNetModel
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel

from configuration_kif import KifConfig
from convert_original_checkpoint import (
    convert_state_dict,
    convert_torchvision_resnet,
    load_state_dict_file,
    main,
)
from kif_testing import TINY_DIR, KifModelTester
from modeling_kif import KifForConditionalGeneration, sinusoidal_position_codes


ORIGINAL_SHAPES = Path(__file__).resolve().parents[2] / "shared" / "original_state_dict_shapes.json"
# Rows of the original's node word table beyond the tiny tokenizer's vocabulary (the original's is 31,092 rows).
EXTRA_WORD_TABLE_ROWS = 7
NOT_IN_ORIGINAL = ("disease_word_embeds", "base_probs", "report_memory_keys", "report_memory_values")
KIF_ONLY_MODULES = ("knowledge_encoder.", "fusion.", "poke.")

# Port name -> original name, the inverse of the converter's mapping (written out independently of it).
INVERSE_RULES = (
    (r"^vision_model\.embedder\.embedder\.convolution\.", lambda m: "visual_encoder.model.0."),
    (r"^vision_model\.embedder\.embedder\.normalization\.", lambda m: "visual_encoder.model.1."),
    (
        r"^vision_model\.encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.convolution\.",
        lambda m: f"visual_encoder.model.{int(m[1]) + 4}.{m[2]}.conv{int(m[3]) + 1}.",
    ),
    (
        r"^vision_model\.encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.normalization\.",
        lambda m: f"visual_encoder.model.{int(m[1]) + 4}.{m[2]}.bn{int(m[3]) + 1}.",
    ),
    (
        r"^vision_model\.encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.convolution\.",
        lambda m: f"visual_encoder.model.{int(m[1]) + 4}.{m[2]}.downsample.0.",
    ),
    (
        r"^vision_model\.encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.normalization\.",
        lambda m: f"visual_encoder.model.{int(m[1]) + 4}.{m[2]}.downsample.1.",
    ),
    (r"^knowledge_encoder\.embedding_norm\.", lambda m: "tag_encoder.bert.embeddings.LayerNorm."),
    (r"^knowledge_encoder\.encoder\.layers\.(\d+)\.self_attn\.", lambda m: f"tag_encoder.encoder.layers.{m[1]}.self_attn."),
    (r"^knowledge_encoder\.encoder\.layers\.(\d+)\.linear1\.", lambda m: f"tag_encoder.encoder.layers.{m[1]}.feed_forward.w_1."),
    (r"^knowledge_encoder\.encoder\.layers\.(\d+)\.linear2\.", lambda m: f"tag_encoder.encoder.layers.{m[1]}.feed_forward.w_2."),
    (r"^knowledge_encoder\.encoder\.layers\.(\d+)\.norm1\.", lambda m: f"tag_encoder.encoder.layers.{m[1]}.sublayer.0.norm."),
    (r"^knowledge_encoder\.encoder\.layers\.(\d+)\.norm2\.", lambda m: f"tag_encoder.encoder.layers.{m[1]}.sublayer.1.norm."),
    (r"^knowledge_encoder\.encoder\.norm\.", lambda m: "tag_encoder.encoder.norm."),
    (r"^fusion\.patch_projection\.", lambda m: "vision_proj2."),
    (r"^fusion\.layers\.(\d+)\.attention\.", lambda m: f"cross_attn.layers.{m[1]}.src_attn."),
    (r"^fusion\.layers\.(\d+)\.feed_forward\.0\.", lambda m: f"cross_attn.layers.{m[1]}.feed_forward.w_1."),
    (r"^fusion\.layers\.(\d+)\.feed_forward\.3\.", lambda m: f"cross_attn.layers.{m[1]}.feed_forward.w_2."),
    (r"^fusion\.layers\.(\d+)\.attention_norm\.", lambda m: f"cross_attn.layers.{m[1]}.sublayer.0.norm."),
    (r"^fusion\.layers\.(\d+)\.feed_forward_norm\.", lambda m: f"cross_attn.layers.{m[1]}.sublayer.1.norm."),
    (r"^fusion\.norm\.", lambda m: "cross_attn.norm."),
    (r"^fusion\.output_mlp\.", lambda m: "mlpp."),
)  # fmt: skip


def original_name(port_key: str) -> str:
    for pattern, replacement in INVERSE_RULES:
        renamed, count = re.subn(pattern, replacement, port_key)
        if count:
            # R2Gen's own LayerNorm calls its parameters gamma/beta.
            if ".sublayer." in renamed or renamed.startswith(("tag_encoder.encoder.norm.", "cross_attn.norm.")):
                renamed = renamed.replace(".weight", ".gamma").replace(".bias", ".beta")
            return renamed
    return port_key  # vision_proj, poke, memory, cls_head, text_decoder: same names


def is_annotated_attention(name: str) -> bool:
    """The original's R2Gen-style attention modules, whose projections are `linears.{0,1,2,3}`."""
    return name.startswith("tag_encoder.") and ".self_attn." in name or ".src_attn." in name


def unpack_attention(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """`<module>.in_proj_weight` -> `<module>.linears.{0,1,2}.weight` (query, key, value); out_proj -> linears.3."""
    packed = re.match(r"^(.+)\.in_proj_(weight|bias)$", name)
    if packed:
        return {f"{packed[1]}.linears.{index}.{packed[2]}": part for index, part in enumerate(tensor.chunk(3))}
    output = re.match(r"^(.+)\.out_proj\.(weight|bias)$", name)
    return {f"{output[1]}.linears.3.{output[2]}": tensor}


def unused_modules(model: KifForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The never-used modules of the original: another memory transformer and three small layers."""
    width, vision = model.config.report_embedding_dim, model.config.vision_hidden_size
    unused = {f"explorer.{key}": tensor.clone() for key, tensor in model.memory.state_dict().items()}
    unused.update({
        "add_ln.layer_norm.weight": torch.ones(vision), "add_ln.layer_norm.bias": torch.zeros(vision),
        "text_proj.weight": torch.zeros(vision, width), "text_proj.bias": torch.zeros(vision),
        "vision_proj_op.weight": torch.zeros(vision, width), "vision_proj_op.bias": torch.zeros(vision),
    })  # fmt: skip
    return unused


def original_layout(model: KifForConditionalGeneration, word_table_rows: int, seed: int = 0) -> dict:
    """A random state_dict in the original code's layout for the model's config."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    original = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(NOT_IN_ORIGINAL) or key == "knowledge_encoder.node_embeddings.weight":
            continue
        value = torch.randn(tensor.shape, generator=generator) if tensor.is_floating_point() else tensor.clone()
        name = original_name(key)
        if is_annotated_attention(name):
            original.update(unpack_attention(name, value))
        else:
            original[name] = value
    # The LM head is tied to the word embeddings in the original too.
    original["text_decoder.cls.predictions.decoder.weight"] = original[
        "text_decoder.bert.embeddings.word_embeddings.weight"
    ]
    original["text_decoder.cls.predictions.decoder.bias"] = original["text_decoder.cls.predictions.bias"]
    hidden = config.knowledge_hidden_size
    original["tag_encoder.bert.embeddings.word_embeddings.weight"] = torch.randn(
        word_table_rows, hidden, generator=generator
    )
    original["tag_encoder.pe.pe"] = sinusoidal_position_codes(config.knowledge_max_groups, hidden).unsqueeze(0)
    positions = config.text_config.max_position_embeddings
    original["text_decoder.bert.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    original.update(unused_modules(model))
    return original  # fmt: skip


@pytest.fixture(scope="module")
def tester():
    return KifModelTester()


@pytest.fixture(scope="module")
def knowledge_tokenizer(tester):
    """A plain WordPiece tokenizer standing in for the one the original's node word table was built with."""
    return BertTokenizer(vocab=tester.processor.tokenizer.get_vocab())


@pytest.fixture(scope="module")
def original(tester, knowledge_tokenizer):
    return original_layout(tester.model(), len(knowledge_tokenizer) + EXTRA_WORD_TABLE_ROWS)


@pytest.fixture(scope="module")
def converted(tester, original, knowledge_tokenizer):
    return convert_state_dict(original, tester.config, knowledge_tokenizer=knowledge_tokenizer)


def converted_model(config: KifConfig, port_state: dict) -> KifForConditionalGeneration:
    model = KifForConditionalGeneration(config).eval()
    model.load_state_dict(port_state, strict=False)
    return model


# --------------------------------------------------------------------------------------------------------- mapping
def test_every_original_tensor_lands_unchanged(tester, original, converted, knowledge_tokenizer):
    port_state, report = converted
    model = converted_model(tester.config, port_state)
    port = model.state_dict()
    for original_key, port_key in report.mapped.items():
        tensor = original[original_key]
        linears = re.search(r"\.linears\.(\d)\.", original_key)
        if linears and linears[1] != "3":
            rows = tensor.shape[0]
            tensor_in_port = port[port_key][int(linears[1]) * rows : (int(linears[1]) + 1) * rows]
            assert torch.equal(tensor_in_port, tensor), original_key
        elif port_key != "knowledge_encoder.node_embeddings.weight":
            assert torch.equal(port[port_key], tensor), f"{original_key} -> {port_key}"

    table = original["tag_encoder.bert.embeddings.word_embeddings.weight"]
    for node, name in enumerate(tester.config.knowledge_node_names):
        pieces = knowledge_tokenizer(name, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(model.knowledge_encoder.node_embeddings.weight[node], table[pieces].mean(dim=0))


def test_attention_packing_uses_q_k_v_order_and_out_proj(original, converted):
    port_state, _ = converted
    prefix = "cross_attn.layers.1.src_attn.linears"
    packed = port_state["fusion.layers.1.attention.in_proj_weight"]
    expected = torch.cat([original[f"{prefix}.{index}.weight"] for index in range(3)])
    assert torch.equal(packed, expected)
    assert torch.equal(port_state["fusion.layers.1.attention.out_proj.bias"], original[f"{prefix}.3.bias"])
    assert torch.equal(
        port_state["knowledge_encoder.encoder.layers.0.norm2.weight"],
        original["tag_encoder.encoder.layers.0.sublayer.1.norm.gamma"],
    )


def annotated_transformer_attention(query, key, value, linears: list[nn.Linear], num_heads: int) -> torch.Tensor:
    """The original's MultiHeadedAttention (R2Gen / the Annotated Transformer), written out as a reference."""
    batch, width = query.shape[0], query.shape[-1]
    head_width = width // num_heads
    q, k, v = (
        linear(x).view(batch, -1, num_heads, head_width).transpose(1, 2)
        for linear, x in zip(linears, (query, key, value))
    )
    weights = (q @ k.transpose(-2, -1) / head_width**0.5).softmax(dim=-1)
    heads = (weights @ v).transpose(1, 2).reshape(batch, -1, width)
    return linears[3](heads)


def test_packed_attention_computes_the_originals_multi_headed_attention(tester, original, converted):
    model = converted_model(tester.config, converted[0])
    width = tester.config.knowledge_hidden_size
    linears = [nn.Linear(width, width) for _ in range(4)]
    for index, linear in enumerate(linears):
        prefix = f"cross_attn.layers.0.src_attn.linears.{index}"
        linear.load_state_dict({"weight": original[f"{prefix}.weight"], "bias": original[f"{prefix}.bias"]})
    patches, knowledge = torch.randn(2, 4, width), torch.randn(2, 28, width)
    with torch.no_grad():
        expected = annotated_transformer_attention(
            patches, knowledge, knowledge, linears, tester.config.fusion_num_heads
        )
        actual, _ = model.fusion.layers[0].attention(patches, knowledge, knowledge, need_weights=False)
    torch.testing.assert_close(actual, expected)


def test_torchvision_resnet_mapping_reproduces_torchvision_features():
    torchvision_model = ResNet(Bottleneck, [1, 1, 1, 1]).eval()
    config = ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck")
    port = ResNetModel(config).eval()
    port.load_state_dict(convert_torchvision_resnet(torchvision_model.state_dict()))
    features = nn.Sequential(*list(torchvision_model.children())[:-2])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(port(images).last_hidden_state, features(images))


def test_report_accounts_for_every_original_key(original, converted):
    _, report = converted
    assert report.model_type == "kif"
    assert set(report.mapped) | set(report.dropped) == set(original)
    assert not report.unmapped and not report.warnings
    assert set(report.missing) == set(NOT_IN_ORIGINAL)
    dropped_modules = {key.split(".")[0] for key in report.dropped}
    assert dropped_modules == {"explorer", "add_ln", "text_proj", "vision_proj_op", "tag_encoder", "text_decoder"}


@pytest.mark.skipif(not ORIGINAL_SHAPES.exists(), reason="the original parameter list (shared/) is not present")
def test_full_size_original_layout_is_entirely_accounted_for():
    """Shape-only: meta tensors for the 1,222 original keys against a meta-device full-size port."""
    shapes = json.loads(ORIGINAL_SHAPES.read_text())
    original = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    port_state, report = convert_state_dict(original, KifConfig())
    assert set(report.mapped) | set(report.dropped) | set(report.unmapped) == set(shapes)
    # Only the node word table needs more than the checkpoint (its tokenizer); it is documented as such.
    assert list(report.unmapped) == ["tag_encoder.bert.embeddings.word_embeddings.weight"]
    assert "--knowledge_tokenizer" in report.unmapped["tag_encoder.bert.embeddings.word_embeddings.weight"]
    assert {key.split(".")[0] for key in report.dropped} >= {"explorer", "add_ln", "text_proj", "vision_proj_op"}
    assert set(report.missing) == {*NOT_IN_ORIGINAL, "knowledge_encoder.node_embeddings.weight"}
    assert len(report.mapped) == 1151 and len(report.dropped) == 70
    assert port_state["fusion.layers.0.attention.in_proj_weight"].shape == (3 * 768, 768)


def test_decoder_gives_the_reference_blip_decoders_logits(tester, original, converted):
    model = converted_model(tester.config, converted[0])
    reference = BlipTextLMHeadModel(tester.config.text_config).eval()
    prefix = "text_decoder."
    decoder_weights = {key[len(prefix) :]: value for key, value in original.items() if key.startswith(prefix)}
    result = reference.load_state_dict(decoder_weights, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["bert.embeddings.position_ids"]

    input_ids = torch.randint(0, tester.config.text_config.vocab_size, (2, 7))
    visual_states = torch.randn(2, 4, tester.config.fusion_output_size)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, encoder_hidden_states=visual_states).logits
        actual = model.text_decoder(input_ids=input_ids, encoder_hidden_states=visual_states).logits
    torch.testing.assert_close(actual, expected)


def test_node_word_table_without_tokenizer_is_reported_unmapped(tester, original):
    _, report = convert_state_dict(original, tester.config)
    assert list(report.unmapped) == ["tag_encoder.bert.embeddings.word_embeddings.weight"]
    assert "knowledge_encoder.node_embeddings.weight" in report.missing


def test_promptmrg_checkpoint_converts_its_shared_parts_with_a_warning(tester, original):
    kif_only = ("tag_encoder.", "vision_proj2.", "cross_attn.", "mlpp.", "poke.")
    promptmrg = {key: value for key, value in original.items() if not key.startswith(kif_only)}
    port_state, report = convert_state_dict(promptmrg, tester.config)
    assert report.model_type == "promptmrg"
    assert torch.equal(port_state["memory.decoder.norm.weight"], promptmrg["memory.decoder.norm.weight"])
    assert all(key.startswith(KIF_ONLY_MODULES + NOT_IN_ORIGINAL) for key in report.missing)
    assert any(key.startswith("fusion.") for key in report.missing)
    assert "PromptMRG has no knowledge graph" in report.missing["knowledge_encoder.embedding_norm.weight"]
    assert any("NOT a trained KIF-ISD model" in warning for warning in report.warnings)


def test_tied_lm_head_that_differs_is_warned_about_and_the_embeddings_win(tester, original):
    changed = dict(original)
    changed["text_decoder.cls.predictions.decoder.weight"] = (
        original["text_decoder.cls.predictions.decoder.weight"] + 1
    )
    port_state, report = convert_state_dict(changed, tester.config)
    assert any("tied weights differ" in warning for warning in report.warnings)
    assert "differs from" in report.dropped["text_decoder.cls.predictions.decoder.weight"]
    model = converted_model(tester.config, port_state)
    assert torch.equal(
        model.text_decoder.cls.predictions.decoder.weight,
        original["text_decoder.bert.embeddings.word_embeddings.weight"],
    )


def test_shape_mismatch_names_both_keys(tester, original):
    wrong = dict(original, **{"cls_head.weight": torch.zeros(5, 5)})
    with pytest.raises(ValueError, match=r"cls_head\.weight.*\(5, 5\)"):
        convert_state_dict(wrong, tester.config)


def test_unknown_keys_are_reported_unmapped(tester, original):
    extra = dict(original, **{"mystery.weight": torch.zeros(3)})
    extra["memory.decoder.layers.9.norm1.weight"] = torch.zeros(64)
    _, report = convert_state_dict(extra, tester.config)
    assert "no mapping rule" in report.unmapped["mystery.weight"]
    assert "lacks" in report.unmapped["memory.decoder.layers.9.norm1.weight"]


# --------------------------------------------------------------------------------------------------------- loading
def test_wrapped_ddp_checkpoint_loads_like_a_bare_state_dict(tmp_path, tester, original, converted):
    path = tmp_path / "model_best.pth"
    torch.save({"model": {f"module.{key}": value for key, value in original.items()}, "epoch": 3}, path)
    loaded = load_state_dict_file(path)
    port_state, _ = convert_state_dict(loaded, tester.config)
    assert port_state.keys() == converted[0].keys() - {"knowledge_encoder.node_embeddings.weight"}
    assert torch.equal(port_state["cls_head.weight"], original["cls_head.weight"])


def test_safetensors_checkpoint_loads(tmp_path, original):
    path = tmp_path / "model_best.safetensors"
    save_file({key: value.clone() for key, value in original.items()}, path)
    loaded = load_state_dict_file(path)
    assert loaded.keys() == original.keys() and torch.equal(loaded["mlpp.0.weight"], original["mlpp.0.weight"])


def test_checkpoint_with_pickled_objects_is_refused(tmp_path, original):
    path = tmp_path / "with_args.pth"
    torch.save({"state_dict": original, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ValueError, match=rf"Refusing to load {re.escape(str(path))}: it pickles argparse\.Namespace"):
        load_state_dict_file(path)


def test_non_checkpoint_file_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_state_dict_file(path)


# --------------------------------------------------------------------------------------------------------- command line
def test_command_line_writes_a_loadable_model_and_a_report(tmp_path, tester, original, knowledge_tokenizer):
    checkpoint = tmp_path / "model_best.pth"
    torch.save(original, checkpoint)
    knowledge_tokenizer.save_pretrained(tmp_path / "knowledge_tokenizer")
    output_dir = tmp_path / "converted"
    main([
        str(checkpoint), str(output_dir), "--config", str(TINY_DIR), "--processor_dir", str(TINY_DIR),
        "--knowledge_tokenizer", str(tmp_path / "knowledge_tokenizer"),
    ])  # fmt: skip

    model = KifForConditionalGeneration.from_pretrained(output_dir)
    assert torch.equal(model.cls_head.weight, original["cls_head.weight"])
    assert torch.equal(model.fusion.output_mlp[2].bias, original["mlpp.2.bias"])
    report = json.loads((output_dir / "conversion_report.json").read_text())
    dropped = len(unused_modules(model)) + 2  # + the two recomputed buffers
    assert report["counts"] == {"mapped": len(original) - dropped, "dropped": dropped, "unmapped": 0, "missing": 4}
    assert (output_dir / "tokenizer_config.json").exists() and (output_dir / "modeling_kif.py").exists()


def test_command_line_converts_a_promptmrg_checkpoint_without_the_poke_query(tmp_path, original):
    kif_only = ("tag_encoder.", "vision_proj2.", "cross_attn.", "mlpp.", "poke.")
    checkpoint = tmp_path / "promptmrg_best.pth"
    torch.save({key: value for key, value in original.items() if not key.startswith(kif_only)}, checkpoint)
    report = main([str(checkpoint), str(tmp_path / "converted"), "--config", str(TINY_DIR)])
    assert report.model_type == "promptmrg" and not report.unmapped
    model = KifForConditionalGeneration.from_pretrained(tmp_path / "converted")
    assert model.config.use_poke_at_inference is False
    assert torch.equal(model.vision_proj.weight, original["vision_proj.weight"])
