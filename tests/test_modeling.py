import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from configuration_kif import STATE_TOKENS, KifConfig
from kif_testing import TINY_DIR, KifModelTester
from modeling_kif import KifForConditionalGeneration, knowledge_attention_mask


ORIGINAL_SHAPES = Path(__file__).resolve().parents[2] / "shared" / "original_state_dict_shapes.json"
GREEDY = {"num_beams": 1, "do_sample": False, "max_new_tokens": 8, "min_new_tokens": 0}
BEAMS = {"num_beams": 3, "do_sample": False, "max_new_tokens": 8, "min_new_tokens": 0}


@pytest.fixture(scope="module")
def tester():
    return KifModelTester()


@pytest.fixture
def model(tester):
    return tester.model()


# --------------------------------------------------------------------------------------------- shapes
def test_shapes_at_each_stage(tester, model):
    config = tester.config
    batch = tester.batch_size
    patches, global_features = model.encode_image(tester.pixel_values())
    assert patches.shape == (batch, tester.num_patches, config.vision_hidden_size)
    assert global_features.shape == (batch, config.vision_hidden_size)

    knowledge, disease_words = model.image_independent_states()
    assert knowledge.shape == (config.num_knowledge_nodes, config.knowledge_hidden_size)
    assert disease_words.shape == (1, config.num_disease_words, config.report_embedding_dim)

    encoded = model.encode(tester.pixel_values(), tester.memory_embeds())
    assert encoded.visual_states.shape == (batch, tester.num_patches, config.fusion_output_size)
    assert encoded.cls_logits.shape == (batch, config.num_states, config.num_observations)

    inputs = tester.training_inputs()
    outputs = model(**inputs)
    assert outputs.logits.shape == (*inputs["input_ids"].shape, config.text_config.vocab_size)
    assert outputs.patch_features.shape == patches.shape
    for name in ("loss", "lm_loss", "cls_loss"):
        assert outputs[name].ndim == 0 and torch.isfinite(outputs[name])
    expected = outputs.lm_loss + config.classification_loss_weight * outputs.cls_loss
    torch.testing.assert_close(outputs.loss, expected)


def test_forward_without_text_runs_only_the_encoder(tester, model):
    outputs = model(pixel_values=tester.pixel_values(), memory_embeds=tester.memory_embeds())
    assert outputs.logits is None and outputs.loss is None
    assert outputs.cls_logits.shape == (tester.batch_size, 4, tester.config.num_observations)


def test_full_size_config_builds_with_the_papers_sizes():
    config = KifConfig()
    with torch.device("meta"):
        model = KifForConditionalGeneration(config)
    assert config.num_retrieved_reports == 21 and config.report_embedding_dim == 512
    assert model.knowledge_encoder.node_embeddings.weight.shape == (28, 768)
    assert model.fusion.output_mlp[-1].weight.shape == (2048, 1024)
    assert model.cls_head.weight.shape == (72, 2560)
    cross_key = model.text_decoder.bert.encoder.layer[0].crossattention.self.key
    assert cross_key.weight.shape == (768, 2048)
    assert model.get_input_embeddings().weight.shape == (30527, 768)


@pytest.mark.skipif(not ORIGINAL_SHAPES.exists(), reason="the original parameter list (shared/) is not present")
def test_full_size_parameter_count_is_the_originals_minus_its_waste():
    """The port has every original parameter except the 4 never-used modules, and one 768-row per graph node instead
    of the 31,092-row word table; tied LM-head weights are stored once."""
    original = json.loads(ORIGINAL_SHAPES.read_text())
    unused = ("explorer.", "add_ln.", "text_proj.", "vision_proj_op.")
    tied = ("text_decoder.cls.predictions.decoder.",)
    buffers = ("running_mean", "running_var", "num_batches_tracked", "position_ids", "pe.pe")
    kept = {
        key: shape
        for key, shape in original.items()
        if not key.startswith(unused + tied)
        and not key.endswith(buffers)
        and key != "tag_encoder.bert.embeddings.word_embeddings.weight"
    }
    expected = sum(math.prod(shape) for shape in kept.values()) + 28 * 768
    with torch.device("meta"):
        model = KifForConditionalGeneration(KifConfig())
    assert sum(parameter.numel() for parameter in model.parameters()) == expected


# --------------------------------------------------------------------------------------------- knowledge graph
def test_knowledge_mask_opens_210_of_784_pairs():
    config = KifConfig()
    blocked = knowledge_attention_mask(
        config.knowledge_node_groups, config.knowledge_node_labels, config.knowledge_global_node
    )
    assert blocked.shape == (28, 28)
    assert int((~blocked).sum()) == 210
    assert bool((~blocked)[0].all()) and bool((~blocked)[:, 0].all())  # the global node sees and is seen by all
    assert torch.equal(blocked, blocked.T)  # visibility is symmetric


def test_knowledge_states_are_cached_and_equal_across_calls_in_eval(model):
    with torch.no_grad():
        first, _ = model.image_independent_states()
        second, _ = model.image_independent_states()
    assert first is second  # served from the cache, not recomputed
    with torch.no_grad():
        model.knowledge_encoder.node_embeddings.weight.add_(1.0)  # an in-place weight update invalidates it
        third, _ = model.image_independent_states()
    assert third is not first and not torch.equal(third, first)


def test_knowledge_states_are_recomputed_in_training(model):
    model.train()
    first, _ = model.image_independent_states()
    second, _ = model.image_independent_states()
    assert first is not second and first.requires_grad


# --------------------------------------------------------------------------------------------- independence
def test_samples_do_not_influence_each_other(tester, model):
    inputs = tester.training_inputs()
    with torch.no_grad():
        batched = model(**inputs)
        for row in range(tester.batch_size):
            length = int(inputs["attention_mask"][row].sum())
            single_inputs = {name: value[row : row + 1] for name, value in inputs.items()}
            for name in ("input_ids", "attention_mask", "labels"):
                single_inputs[name] = single_inputs[name][:, :length]
            single = model(**single_inputs)
            torch.testing.assert_close(single.cls_logits[0], batched.cls_logits[row], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(single.logits[0], batched.logits[row, :length], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- training signal
def test_loss_falls_when_overfitting_a_tiny_batch(tester, model):
    inputs = tester.training_inputs()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < 0.5 * losses[0]


def test_prompt_positions_carry_no_lm_loss(tester, model):
    inputs = tester.training_inputs()
    prompt_length = tester.config.prompt_length
    assert bool((inputs["labels"][:, :prompt_length] == -100).all())
    outputs = model(**inputs)
    (gradient,) = torch.autograd.grad(outputs.lm_loss, outputs.logits)
    # logits[t] predicts token t + 1: positions predicting a prompt token get no gradient, the first report token does.
    assert bool((gradient[:, : prompt_length - 1] == 0).all())
    assert bool((gradient[:, prompt_length - 1].abs().sum(-1) > 0).all())


def test_classification_loss_uses_logit_adjustment_and_ignores_unlabelled(tester, model):
    logits = torch.zeros(1, 4, tester.config.num_observations)
    labels = torch.full((1, tester.config.num_observations), -100)
    labels[0, 0] = 1
    model.base_probs.fill_(1.0)
    assert model.classification_loss(logits, labels).item() == pytest.approx(math.log(4))
    model.base_probs[0] = 0.5  # positive logit lowered by log 2: p(positive) = 0.5 / 3.5
    assert model.classification_loss(logits, labels).item() == pytest.approx(-math.log(0.5 / 3.5))
    assert model.classification_loss(logits, torch.full_like(labels, -100)).item() == 0.0


# --------------------------------------------------------------------------------------------- generation
def naive_greedy(model, pixel_values, memory_embeds, steps):
    """Greedy decoding with full forward passes and no cache: the reference for the cached `generate`."""
    states = model.predict_findings(pixel_values, memory_embeds).states
    sequence = model.build_prompt_ids(states)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(pixel_values=pixel_values, input_ids=sequence, memory_embeds=memory_embeds).logits
        sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=1)
    return sequence


def test_generate_with_cache_equals_uncached_decoding(tester, model):
    pixels, memory = tester.pixel_values(), tester.memory_embeds()
    cached = model.generate(pixels, memory_embeds=memory, **GREEDY, eos_token_id=None)
    uncached = model.generate(pixels, memory_embeds=memory, **GREEDY, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, naive_greedy(model, pixels, memory, GREEDY["max_new_tokens"]))


def test_generate_batch_equals_single(tester, model):
    pixels, memory = tester.pixel_values(), tester.memory_embeds()
    for settings in (GREEDY, BEAMS):
        batched = model.generate(pixels, memory_embeds=memory, **settings, eos_token_id=None)
        for row in range(tester.batch_size):
            single = model.generate(
                pixels[row : row + 1], memory_embeds=memory[row : row + 1], **settings, eos_token_id=None
            )
            assert torch.equal(single[0], batched[row])


def test_beam_search_scores_at_least_greedy(tester, model):
    """Beam search keeps the best of 3 hypotheses per step, so its sequence log-probability is >= greedy's."""
    pixels, memory = tester.pixel_values()[:1], tester.memory_embeds()[:1]

    def log_probability(sequence):
        with torch.no_grad():
            logits = model(pixel_values=pixels, input_ids=sequence, memory_embeds=memory).logits
        start = tester.config.prompt_length
        steps = F.log_softmax(logits[:, start - 1 : -1], dim=-1).gather(-1, sequence[:, start:, None])
        return steps.sum().item()

    greedy = model.generate(pixels, memory_embeds=memory, **GREEDY, eos_token_id=None)
    beams = model.generate(pixels, memory_embeds=memory, **BEAMS, eos_token_id=None, length_penalty=0.0)
    assert log_probability(beams) >= log_probability(greedy) - 1e-4


def test_sampling_works_in_batches(tester, model):
    torch.manual_seed(0)
    sequences = model.generate(
        tester.pixel_values(), memory_embeds=tester.memory_embeds(), do_sample=True, top_p=0.9, max_new_tokens=5,
        min_new_tokens=0, num_beams=1, num_return_sequences=2,
    )  # fmt: skip
    assert sequences.shape[0] == 2 * tester.batch_size


def test_generate_returns_findings_and_the_prompt_is_built_from_them(tester, model):
    output = model.generate(
        tester.pixel_values(), memory_embeds=tester.memory_embeds(), return_dict_in_generate=True, **GREEDY
    )
    findings = output.findings
    assert findings.states.shape == (tester.batch_size, tester.config.num_observations)
    torch.testing.assert_close(findings.probabilities.sum(-1), torch.ones(tester.batch_size, 18))
    assert torch.equal(findings.states, findings.probabilities.argmax(-1))
    prompt = output.sequences[:, : tester.config.prompt_length]
    assert torch.equal(prompt, model.build_prompt_ids(findings.states))


def test_decoded_text_never_contains_prompt_tokens(tester, model):
    sequences = model.generate(tester.pixel_values(), memory_embeds=tester.memory_embeds(), **BEAMS)
    for text in tester.processor.batch_decode(sequences):
        assert not any(token.lower() in text.lower() for token in (*STATE_TOKENS, "[DEC]", "[SEP]", "[PAD]"))


# --------------------------------------------------------------------------------------------- retrieved memory
def test_missing_memory_raises_a_helpful_error(tester, model):
    with pytest.raises(ValueError, match="memory_embeds.*set_report_memory"):
        model.generate(tester.pixel_values(), **GREEDY)


def test_wrong_memory_shape_is_refused(tester, model):
    with pytest.raises(ValueError, match="memory_embeds must be"):
        model.generate(tester.pixel_values(), memory_embeds=tester.memory_embeds()[:, :, :5], **GREEDY)


def test_report_memory_index_retrieves_nearest_reports(tester, model):
    config = tester.config
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(30, config.vision_hidden_size, generator=generator)
    values = torch.randn(30, config.report_embedding_dim, generator=generator)
    model.set_report_memory(keys, values)
    assert config.report_memory_size == 30 and model.report_memory_keys.shape == (30, config.vision_hidden_size)

    _, global_features = model.encode_image(tester.pixel_values())
    similarity = F.normalize(global_features, dim=-1) @ F.normalize(keys, dim=-1).T
    expected = values[similarity.topk(config.num_retrieved_reports, dim=-1).indices]
    torch.testing.assert_close(model.retrieve_memory(global_features), expected)

    from_index = model.generate(tester.pixel_values(), **GREEDY)
    explicit = model.generate(tester.pixel_values(), memory_embeds=expected, **GREEDY)
    assert torch.equal(from_index, explicit)


# --------------------------------------------------------------------------------------------- save / load
def config_fields(config) -> dict:
    """The config as a dict, without the load path and dtype that `from_pretrained` records."""
    fields = json.loads(config.to_json_string(use_diff=False))
    for section in (fields, fields["text_config"], fields["vision_config"]):
        section.pop("_name_or_path", None)
        section.pop("dtype", None)
    return fields


def test_save_and_load_give_identical_outputs(tmp_path, tester, model):
    keys = torch.randn(10, tester.config.vision_hidden_size)
    model.set_report_memory(keys, torch.randn(10, tester.config.report_embedding_dim))
    model.base_probs.copy_(torch.linspace(0.1, 1.0, tester.config.num_observations))
    model.save_pretrained(tmp_path)
    reloaded = KifForConditionalGeneration.from_pretrained(tmp_path).eval()

    assert config_fields(reloaded.config) == config_fields(model.config)
    torch.testing.assert_close(reloaded.base_probs, model.base_probs)
    inputs = tester.training_inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)
    assert torch.equal(
        reloaded.generate(tester.pixel_values(), **BEAMS), model.generate(tester.pixel_values(), **BEAMS)
    )
    assert reloaded.generation_config.num_beams == model.generation_config.num_beams


def test_auto_classes_resolve_to_the_kif_classes():
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from processing_kif import KifProcessor

    config = AutoConfig.from_pretrained(TINY_DIR)
    assert isinstance(config, KifConfig)
    assert isinstance(AutoModel.from_config(config), KifForConditionalGeneration)
    assert isinstance(AutoModelForImageTextToText.from_config(config), KifForConditionalGeneration)
    assert isinstance(AutoProcessor.from_pretrained(TINY_DIR), KifProcessor)


def test_generation_presets_are_in_the_default_generation_config():
    with torch.device("meta"):
        model = KifForConditionalGeneration(KifConfig())
    generation_config = model.generation_config
    assert (generation_config.num_beams, generation_config.min_new_tokens, generation_config.max_new_tokens) == (
        3,
        100,
        150,
    )
    assert generation_config.eos_token_id == model.config.text_config.sep_token_id
