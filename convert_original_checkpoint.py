"""Convert an original KIF-ISD (or PromptMRG) checkpoint into a saved `KifForConditionalGeneration`.

    python convert_original_checkpoint.py model_best.pth outputs/kif-converted \
        --processor_dir outputs/kif-default/final --knowledge_tokenizer path/to/knowledge-tokenizer

Original checkpoints are `torch.save(model.state_dict())` files of the published code (ZIENxc/KIF-ISDforMRG, a fork
of PromptMRG). Only tensors are read (`torch.load(..., weights_only=True)`): a file that pickles other objects is
refused, never unpickled. Every original key ends up in `OUTPUT_DIR/conversion_report.json` as mapped (to a port
parameter), dropped (modules the original built but never used, buffers the port recomputes) or unmapped; every port
parameter that the checkpoint does not fill is listed as missing, with the reason.

Mapping (original -> port):

    visual_encoder.model.{0,1,4..7}.*   torchvision ResNet-101 children -> vision_model (transformers ResNetModel)
    tag_encoder.bert.embeddings.*       31,092-row word table -> knowledge_encoder.node_embeddings (one row per node:
                                        the mean of the rows of its name's word pieces; needs the tokenizer of that
                                        table), LayerNorm -> knowledge_encoder.embedding_norm
    tag_encoder.encoder.*               knowledge_encoder.encoder (torch TransformerEncoder, pre-norm)
    vision_proj2, cross_attn.*, mlpp.*  fusion.patch_projection, fusion.layers / fusion.norm, fusion.output_mlp
    vision_proj, poke, memory,          same names
    cls_head, text_decoder

Inside the R2Gen-style transformers (`tag_encoder`, `cross_attn`), `*.linears.{0,1,2,3}` (query, key, value, output)
become torch `MultiheadAttention`'s packed `in_proj_weight` = cat(query, key, value) and `out_proj`; `feed_forward.w_1
/ w_2` the feed-forward linears; `sublayer.{0,1}.norm.gamma/beta` the pre-norm LayerNorms' weight/bias.
"""

import argparse
import json
import pickle
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from transformers import AutoTokenizer

from configuration_kif import KifConfig
from modeling_kif import KifForConditionalGeneration, sinusoidal_position_codes
from processing_kif import KifProcessor


REPORT_FILE = "conversion_report.json"
MODEL_TYPES = ("kif", "promptmrg")
# Where a checkpoint wraps its state_dict (e.g. with optimizer state); a bare state_dict has none of them.
STATE_DICT_ENTRIES = ("model", "state_dict", "model_state_dict")
DDP_PREFIX = "module."

# Modules of the original that its forward pass never uses.
UNUSED_MODULES = {
    "explorer": "a second DETR-style transformer the original built but never called",
    "add_ln": "a LayerNorm the original built but never called",
    "text_proj": "a projection the original built but never called",
    "vision_proj_op": "a projection the original built but never called",
}
# Buffers the port rebuilds from its config instead of loading them.
POSITION_CODE_KEY = "tag_encoder.pe.pe"
RECOMPUTED_BUFFERS = {
    POSITION_CODE_KEY: "sinusoidal group position code: the port rebuilds it from the config "
    "(knowledge_encoder.group_position_codes, not saved)",
    "text_decoder.bert.embeddings.position_ids": "position index buffer: the port rebuilds it (not saved)",
}
NODE_WORD_TABLE_KEY = "tag_encoder.bert.embeddings.word_embeddings.weight"
NODE_EMBEDDINGS_KEY = "knowledge_encoder.node_embeddings.weight"
# Present only in KIF-ISD checkpoints; PromptMRG checkpoints have the other, shared parts.
KIF_ONLY_PREFIXES = ("tag_encoder.", "vision_proj2.", "cross_attn.", "mlpp.", "poke.")
SHARED_PREFIXES = ("visual_encoder.", "text_decoder.")
# Port modules with no counterpart in PromptMRG.
PROMPTMRG_ABSENT_MODULES = {
    "knowledge_encoder.": "PromptMRG has no knowledge graph",
    "fusion.": "PromptMRG has no cross-modal fusion",
    "poke.": "PromptMRG has no disease-word poke transformer",
}
# Port state that no original checkpoint holds.
MISSING_NOTES = {
    "disease_word_embeds": "not in original checkpoints (the original read the disease-word text embeddings from a "
    "file); set `model.disease_word_embeds` (num_disease_words, report_embedding_dim) before use",
    "base_probs": "not in original checkpoints (the original read them from base_probs.json); all ones = no logit "
    "adjustment, which only training uses",
    "report_memory_keys": "the port's own report-memory index: set it with `model.set_report_memory`",
    "report_memory_values": "the port's own report-memory index: set it with `model.set_report_memory`",
    NODE_EMBEDDINGS_KEY: "built from the original's node word table only when the tokenizer of that table is given "
    "(--knowledge_tokenizer); otherwise at initialisation",
}

# torchvision's ResNet children in `nn.Sequential(*list(resnet.children())[:-2])` order; 2 (relu) and 3 (maxpool)
# hold no weights.
TORCHVISION_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
# torchvision ResNet names -> transformers `ResNetModel` names. A bottleneck's conv{k}/bn{k} is the port's layer.{k-1};
# torchvision's layer{i} is the port's stage i-1.
TORCHVISION_RESNET_RULES: tuple[tuple[str, str | Callable[[re.Match], str]], ...] = (
    (r"^conv1\.", "embedder.embedder.convolution."),
    (r"^bn1\.", "embedder.embedder.normalization."),
    (
        r"^layer(\d)\.(\d+)\.conv(\d)\.",
        lambda match: f"encoder.stages.{int(match[1]) - 1}.layers.{match[2]}.layer.{int(match[3]) - 1}.convolution.",
    ),
    (
        r"^layer(\d)\.(\d+)\.bn(\d)\.",
        lambda match: f"encoder.stages.{int(match[1]) - 1}.layers.{match[2]}.layer.{int(match[3]) - 1}.normalization.",
    ),
    (
        r"^layer(\d)\.(\d+)\.downsample\.0\.",
        lambda match: f"encoder.stages.{int(match[1]) - 1}.layers.{match[2]}.shortcut.convolution.",
    ),
    (
        r"^layer(\d)\.(\d+)\.downsample\.1\.",
        lambda match: f"encoder.stages.{int(match[1]) - 1}.layers.{match[2]}.shortcut.normalization.",
    ),
)
TORCHVISION_CLASSIFIER_PREFIX = "fc."

# Original names -> port names, first match wins. Attention projections keep a `linears.N` marker here and are packed
# afterwards (`pack_attention_projections`); the custom LayerNorm's gamma/beta are renamed afterwards too.
ORIGINAL_RULES: tuple[tuple[str, str], ...] = (
    (r"^tag_encoder\.bert\.embeddings\.LayerNorm\.", "knowledge_encoder.embedding_norm."),
    (r"^tag_encoder\.encoder\.layers\.(\d+)\.self_attn\.linears\.", r"knowledge_encoder.encoder.layers.\1.self_attn.linears."),
    (r"^tag_encoder\.encoder\.layers\.(\d+)\.feed_forward\.w_1\.", r"knowledge_encoder.encoder.layers.\1.linear1."),
    (r"^tag_encoder\.encoder\.layers\.(\d+)\.feed_forward\.w_2\.", r"knowledge_encoder.encoder.layers.\1.linear2."),
    (r"^tag_encoder\.encoder\.layers\.(\d+)\.sublayer\.0\.norm\.", r"knowledge_encoder.encoder.layers.\1.norm1."),
    (r"^tag_encoder\.encoder\.layers\.(\d+)\.sublayer\.1\.norm\.", r"knowledge_encoder.encoder.layers.\1.norm2."),
    (r"^tag_encoder\.encoder\.norm\.", "knowledge_encoder.encoder.norm."),
    (r"^vision_proj2\.", "fusion.patch_projection."),
    (r"^cross_attn\.layers\.(\d+)\.src_attn\.linears\.", r"fusion.layers.\1.attention.linears."),
    (r"^cross_attn\.layers\.(\d+)\.feed_forward\.w_1\.", r"fusion.layers.\1.feed_forward.0."),
    (r"^cross_attn\.layers\.(\d+)\.feed_forward\.w_2\.", r"fusion.layers.\1.feed_forward.3."),
    (r"^cross_attn\.layers\.(\d+)\.sublayer\.0\.norm\.", r"fusion.layers.\1.attention_norm."),
    (r"^cross_attn\.layers\.(\d+)\.sublayer\.1\.norm\.", r"fusion.layers.\1.feed_forward_norm."),
    (r"^cross_attn\.norm\.", "fusion.norm."),
    (r"^mlpp\.", "fusion.output_mlp."),
    (r"^(vision_proj|poke|memory|cls_head|text_decoder)\.", r"\1."),
)  # fmt: skip
LAYER_NORM_SUFFIXES = ((r"\.gamma$", ".weight"), (r"\.beta$", ".bias"))
# `linears.0..3` of the Annotated Transformer's MultiHeadedAttention: query, key, value, output.
ATTENTION_PROJECTION = re.compile(r"^(?P<module>.+)\.linears\.(?P<index>[0-3])\.(?P<kind>weight|bias)$")
INPUT_PROJECTIONS = ("0", "1", "2")
OUTPUT_PROJECTION = "3"


@dataclass
class ConversionReport:
    """What happened to every original key, and which port keys the checkpoint did not fill (with reasons)."""

    model_type: str
    mapped: dict[str, str] = field(default_factory=dict)  # original key -> port key
    dropped: dict[str, str] = field(default_factory=dict)  # original key -> why the port does not need it
    unmapped: dict[str, str] = field(default_factory=dict)  # original key -> why it could not be mapped
    missing: dict[str, str] = field(default_factory=dict)  # port key -> why it keeps its initial value
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        counts = {name: len(getattr(self, name)) for name in ("mapped", "dropped", "unmapped", "missing")}
        return {"counts": counts, **asdict(self)}


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------
def _pickled_objects(path: Path) -> str:
    """Describe what makes a checkpoint more than tensors, for the refusal message."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError):
        return "it is not a PyTorch checkpoint"
    return f"it pickles {', '.join(unsafe)}" if unsafe else "it is not a tensors-only checkpoint"


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the state_dict of a `.pth` (or `.safetensors`) file - an original checkpoint or torchvision weights -
    never unpickling anything but tensors.

    Accepts a bare state_dict or a dict holding it under `model`, `state_dict` or `model_state_dict`.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint {path} does not exist or is not a file.")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Refusing to load {path}: {_pickled_objects(path)}. Only tensors are read, because unpickling other "
            "objects can run arbitrary code. Re-save the weights alone with `torch.save(model.state_dict(), path)`."
        ) from error
    if isinstance(checkpoint, dict):
        entry = next((name for name in STATE_DICT_ENTRIES if isinstance(checkpoint.get(name), dict)), None)
        state_dict = checkpoint[entry] if entry else checkpoint
    else:
        state_dict = checkpoint
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state_dict.")
    not_tensors = sorted(key for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{path} is not a state_dict: the entries {not_tensors[:10]} are not tensors.")
    return state_dict


# ---------------------------------------------------------------------------------------------------------------------
# Key mapping
# ---------------------------------------------------------------------------------------------------------------------
def rename(key: str, rules) -> str | None:
    """Apply the first matching (pattern, replacement) rule to `key`; None when no rule matches."""
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return None


def torchvision_resnet_key(key: str) -> str | None:
    """The transformers `ResNetModel` name of a torchvision ResNet key (`layer1.0.conv1.weight` ->
    `encoder.stages.0.layers.0.layer.0.convolution.weight`); None for keys outside the feature extractor."""
    return rename(key, TORCHVISION_RESNET_RULES)


def convert_torchvision_resnet(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state_dict in transformers `ResNetModel` names. The classifier (`fc.*`) is left out: the
    port uses the feature map only."""
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        if key.startswith(TORCHVISION_CLASSIFIER_PREFIX):
            continue
        new_key = torchvision_resnet_key(key)
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = tensor
    if unknown:
        raise ValueError(f"Not torchvision ResNet parameters: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}.")
    return converted


def original_vision_key(key: str) -> str | None:
    """`visual_encoder.model.4.0.conv1.weight` -> `vision_model.encoder.stages.0.layers.0.layer.0.convolution.weight`."""
    match = re.match(r"^visual_encoder\.model\.(\d+)\.(.+)$", key)
    if match is None or match[1] not in TORCHVISION_CHILDREN:
        return None
    port_key = torchvision_resnet_key(f"{TORCHVISION_CHILDREN[match[1]]}.{match[2]}")
    return None if port_key is None else f"vision_model.{port_key}"


def original_key_to_port(key: str) -> str | None:
    """The port name of an original key, with attention projections still as `<module>.linears.N.*`."""
    if key.startswith("visual_encoder."):
        return original_vision_key(key)
    port_key = rename(key, ORIGINAL_RULES)
    return None if port_key is None else rename(port_key, LAYER_NORM_SUFFIXES) or port_key


# A port key's tensor and the original keys it comes from (three for packed attention projections).
Sourced = tuple[list[str], torch.Tensor]


def pack_attention_projections(renamed: dict[str, Sourced], report: ConversionReport) -> dict[str, Sourced]:
    """Replace `<module>.linears.{0,1,2,3}.*` by torch MultiheadAttention's `<module>.in_proj_*` (query, key and value
    stacked in that order, as torch splits them) and `<module>.out_proj.*`."""
    groups: dict[tuple[str, str], dict[str, Sourced]] = {}
    packed = {}
    for port_key, source in renamed.items():
        match = ATTENTION_PROJECTION.match(port_key)
        if match:
            groups.setdefault((match["module"], match["kind"]), {})[match["index"]] = source
        else:
            packed[port_key] = source
    for (module, kind), projections in groups.items():
        if OUTPUT_PROJECTION in projections:
            packed[f"{module}.out_proj.{kind}"] = projections.pop(OUTPUT_PROJECTION)
        if all(index in projections for index in INPUT_PROJECTIONS):
            parts = [projections[index] for index in INPUT_PROJECTIONS]
            packed[f"{module}.in_proj_{kind}"] = (
                [key for keys, _ in parts for key in keys],
                torch.cat([tensor for _, tensor in parts]),
            )
        else:
            for keys, _ in projections.values():
                report.unmapped.update(dict.fromkeys(keys, "incomplete attention: query, key and value are needed"))
    return packed


def node_embeddings_from_word_table(table: torch.Tensor, node_names: list[str], tokenizer) -> torch.Tensor:
    """One row per knowledge node: the mean of the table rows of its name's word pieces."""
    rows = []
    for name in node_names:
        piece_ids = tokenizer(name, add_special_tokens=False)["input_ids"]
        if not piece_ids or max(piece_ids) >= table.shape[0]:
            raise ValueError(
                f"The knowledge tokenizer gives node {name!r} the ids {piece_ids}, which the original's "
                f"{table.shape[0]}-row node word table cannot index: pass the tokenizer of that table."
            )
        rows.append(table[piece_ids].float().mean(dim=0))
    return torch.stack(rows).to(table.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------------
def _has_values(*tensors: torch.Tensor) -> bool:
    """Shape-only conversions (meta tensors, e.g. to plan one) skip the value checks."""
    return not any(tensor.is_meta for tensor in tensors)


def check_position_code(pe: torch.Tensor, config: KifConfig, report: ConversionReport) -> None:
    """The original's group position code should be the sinusoid table the port rebuilds; say so if it is not."""
    expected = sinusoidal_position_codes(config.knowledge_max_groups, config.knowledge_hidden_size)
    table = pe.reshape(-1, pe.shape[-1])
    if table.shape != expected.shape:
        report.warnings.append(
            f"{POSITION_CODE_KEY} is {tuple(table.shape)} but the config's table is {tuple(expected.shape)} "
            "(knowledge_max_groups, knowledge_hidden_size): check --config."
        )
    elif _has_values(table) and not torch.allclose(table.float(), expected, atol=1e-5):
        difference = (table.float() - expected).abs().max().item()
        report.warnings.append(
            f"{POSITION_CODE_KEY} differs from the sinusoid table the port uses (max |diff| {difference:.3g})."
        )


def check_tied_weights(port_state: dict, tied_keys: dict[str, str], report: ConversionReport) -> None:
    """The port ties the LM head to the word embeddings; an original whose copies differ keeps the source's values."""
    for target, source in tied_keys.items():
        if target not in port_state or source not in port_state:
            continue
        target_tensor, source_tensor = port_state[target], port_state[source]
        if _has_values(target_tensor, source_tensor) and not torch.equal(target_tensor, source_tensor):
            difference = (target_tensor.float() - source_tensor.float()).abs().max().item()
            report.warnings.append(
                f"The original's tied weights differ: {target} vs {source} (max |diff| {difference:.3g}). The port "
                f"ties them and keeps {source}."
            )
            del port_state[target]
            for original_key in [key for key, port_key in report.mapped.items() if port_key == target]:
                del report.mapped[original_key]
                report.dropped[original_key] = f"differs from {source}, to which the port ties {target}"


def detect_model_type(original: dict[str, torch.Tensor]) -> str:
    """`kif` when the knowledge-graph/fusion/poke parts are present, `promptmrg` when only the shared parts are."""
    if not any(key.startswith(SHARED_PREFIXES) for key in original):
        raise ValueError(
            f"This is not a KIF-ISD or PromptMRG state_dict: no key starts with {SHARED_PREFIXES} "
            f"(first keys: {list(original)[:5]})."
        )
    return "kif" if any(key.startswith(KIF_ONLY_PREFIXES) for key in original) else "promptmrg"


def port_layout(config: KifConfig) -> tuple[dict[str, torch.Size], dict[str, str]]:
    """Shapes of the port's state_dict and its tied keys, from a model on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = KifForConditionalGeneration(config)
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    return shapes, dict(model.all_tied_weights_keys)


def _missing_reason(port_key: str, model_type: str) -> str:
    if port_key in MISSING_NOTES:
        return MISSING_NOTES[port_key]
    if model_type == "promptmrg":
        for prefix, reason in PROMPTMRG_ABSENT_MODULES.items():
            if port_key.startswith(prefix):
                return f"{reason}: kept at initialisation"
    return "no original tensor maps here: kept at initialisation"


# ---------------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------------
def convert_state_dict(
    original: dict[str, torch.Tensor],
    config: KifConfig,
    *,
    knowledge_tokenizer=None,
    model_type: str | None = None,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map an original KIF-ISD / PromptMRG state_dict onto the port's names and layout.

    Args:
        original: The original state_dict (a `module.` prefix from DDP is stripped).
        config: Configuration of the port model to fill; every mapped tensor is checked against its shapes.
        knowledge_tokenizer: Tokenizer of the original's knowledge-node word table. With it, each node embedding is
            the mean of the table rows of its name's word pieces; without it, the table is reported unmapped.
        model_type: `"kif"` or `"promptmrg"`; detected from the keys when omitted.

    Returns:
        The port state_dict (tensors shared with `original` where no packing was needed) and a
        [`ConversionReport`].
    """
    original = dict(original)
    consume_prefix_in_state_dict_if_present(original, DDP_PREFIX)
    model_type = model_type or detect_model_type(original)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}.")
    report = ConversionReport(model_type=model_type)
    port_shapes, tied_keys = port_layout(config)

    renamed: dict[str, Sourced] = {}
    for key, tensor in original.items():
        module = key.split(".", 1)[0]
        if module in UNUSED_MODULES:
            report.dropped[key] = UNUSED_MODULES[module]
        elif key in RECOMPUTED_BUFFERS:
            report.dropped[key] = RECOMPUTED_BUFFERS[key]
            if key == POSITION_CODE_KEY:
                check_position_code(tensor, config, report)
        elif key == NODE_WORD_TABLE_KEY:
            if knowledge_tokenizer is None:
                report.unmapped[key] = (
                    "the node word table needs the tokenizer it was built with (--knowledge_tokenizer) to average "
                    f"each node name's word pieces into {NODE_EMBEDDINGS_KEY}"
                )
            else:
                table = node_embeddings_from_word_table(tensor, config.knowledge_node_names, knowledge_tokenizer)
                renamed[NODE_EMBEDDINGS_KEY] = ([key], table)
        elif (port_key := original_key_to_port(key)) is None:
            report.unmapped[key] = "no mapping rule: not a parameter of KIF-ISD or PromptMRG"
        else:
            renamed[port_key] = ([key], tensor)

    port_state = {}
    for port_key, (sources, tensor) in pack_attention_projections(renamed, report).items():
        if port_key not in port_shapes:
            for source in sources:
                report.unmapped[source] = f"would be {port_key}, which a model of this config lacks (check --config)"
            continue
        if tensor.shape != port_shapes[port_key]:
            raise ValueError(
                f"Shape mismatch: original {' + '.join(sources)} gives {port_key} the shape {tuple(tensor.shape)}, "
                f"but the config expects {tuple(port_shapes[port_key])}. Does --config match the checkpoint?"
            )
        port_state[port_key] = tensor
        report.mapped.update(dict.fromkeys(sources, port_key))

    check_tied_weights(port_state, tied_keys, report)
    for port_key in port_shapes:
        filled_by_tie = tied_keys.get(port_key) in port_state
        if port_key not in port_state and not filled_by_tie:
            report.missing[port_key] = _missing_reason(port_key, model_type)
    if model_type == "promptmrg":
        report.warnings.append(
            "PromptMRG checkpoint: the knowledge encoder, fusion and poke transformer keep their random "
            "initialisation, and the decoder now attends to the (untrained) fused states instead of PromptMRG's raw "
            "image features, so the result is NOT a trained KIF-ISD model: fine-tune it before use."
        )
    return port_state, report


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
def load_config(path: str | None) -> KifConfig:
    """The full-size default, or a config directory / JSON file."""
    return KifConfig() if path is None else KifConfig.from_pretrained(path)


def load_processor(path: str, config: KifConfig) -> KifProcessor:
    """The processor to save beside the model; its tokenizer must produce the config's token ids."""
    processor = KifProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    if len(tokenizer) != config.text_config.vocab_size or processor.state_token_ids != config.state_token_ids:
        raise ValueError(
            f"The tokenizer in {path} ({len(tokenizer)} tokens, state ids {processor.state_token_ids}) does not match "
            f"the config (vocab_size {config.text_config.vocab_size}, state_token_ids {config.state_token_ids})."
        )
    return processor


def print_report(report: ConversionReport) -> None:
    counts = report.to_dict()["counts"]
    print(f"Converted a {report.model_type} checkpoint: " + ", ".join(f"{n} {name}" for name, n in counts.items()))
    dropped_modules = sorted({key.split(".", 1)[0] for key in report.dropped if key not in RECOMPUTED_BUFFERS})
    if dropped_modules:
        print(f"Dropped never-used modules: {', '.join(dropped_modules)}")
    for title, entries in (("Unmapped original keys", report.unmapped), ("Missing port keys", report.missing)):
        if entries:
            print(f"{title}:")
            for key, reason in entries.items():
                print(f"  {key}: {reason}")
    for warning in report.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="Original .pth (state_dict) or .safetensors file.")
    parser.add_argument("output_dir", help="Where to save the converted model (save_pretrained).")
    parser.add_argument("--config", help="Config directory or JSON file of the port model (default: full size).")
    parser.add_argument("--processor_dir", help="Processor to save beside the model (its tokenizer must match).")
    parser.add_argument(
        "--knowledge_tokenizer", help="Tokenizer (directory or Hub id) of the original's knowledge-node word table."
    )
    parser.add_argument("--model_type", choices=MODEL_TYPES, help="Detected from the keys when omitted.")
    return parser.parse_args(argv)


def main(argv=None) -> ConversionReport:
    args = parse_args(argv)
    original = load_state_dict_file(args.checkpoint)
    config = load_config(args.config)
    processor = load_processor(args.processor_dir, config) if args.processor_dir else None
    knowledge_tokenizer = AutoTokenizer.from_pretrained(args.knowledge_tokenizer) if args.knowledge_tokenizer else None

    port_state, report = convert_state_dict(
        original, config, knowledge_tokenizer=knowledge_tokenizer, model_type=args.model_type
    )
    if report.model_type == "promptmrg":
        config.use_poke_at_inference = False
        report.warnings.append("use_poke_at_inference set to False: PromptMRG queries its memory with q, not q'.")
    model = KifForConditionalGeneration(config)
    model.load_state_dict(port_state, strict=False)

    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    (output_dir / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    print_report(report)
    print(f"Saved the converted model to {output_dir} (report: {output_dir / REPORT_FILE}).")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
