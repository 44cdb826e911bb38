"""KIF-ISD: graph-driven chest X-ray report generation (Applied Sciences 2025, doi:10.3390/app152010974).

The forward pass, for a batch of B images (full-size shapes):

    pixel_values (B,3,224,224) -> ResNet-101 -> patches P (B,49,2048), global feature g (B,2048)
    knowledge graph (28 nodes) -> masked transformer -> knowledge states K (28,768)      [image-independent]
    P, K -> cross-attention fusion -> fused visual states V (B,49,2048)                  [decoder memory]
    g -> q (B,512); disease words W (20,512) -> poke transformer(q) -> q' (B,512)
    retrieved reports M (B,21,512) -> memory transformer(q') -> h (B,512)
    [g; h] -> diagnosis classifier -> state logits (B,4,18) -> prompt "[DEC] s_1 .. s_18"
    prompt + report, V -> BERT decoder (BLIP's) -> next-token logits

This file is shipped with saved models as custom code: it imports nothing from training-only code.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForImageTextToText, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel
from transformers.models.resnet.modeling_resnet import ResNetModel
from transformers.utils import ModelOutput


# Importing the processor module registers KifProcessor with AutoProcessor, so importing the model is enough.
try:
    from .configuration_kif import GENERATION_PRESETS, KifConfig
    from .processing_kif import KifProcessor  # noqa: F401
except ImportError:  # imported as a top-level module (project installed or on sys.path), not as remote code
    from configuration_kif import GENERATION_PRESETS, KifConfig
    from processing_kif import KifProcessor  # noqa: F401


IGNORE_INDEX = -100
POSITIVE_STATE = 1
# Floor of base_probs before the log of the logit adjustment: a class never predicted must not give -inf.
MIN_BASE_PROB = 1e-6


@dataclass
class KifOutput(ModelOutput):
    r"""
    Output of [`KifForConditionalGeneration.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): `lm_loss + classification_loss_weight * cls_loss` (terms present).
        lm_loss (`torch.FloatTensor` of shape `()`): Label-smoothed LM loss over report tokens.
        cls_loss (`torch.FloatTensor` of shape `()`): Cross-entropy of the logit-adjusted diagnosis classifier.
        logits (`torch.FloatTensor` of shape `(B, L, vocab_size)`): Next-token logits of the decoder.
        cls_logits (`torch.FloatTensor` of shape `(B, num_states, num_observations)`): Diagnosis classifier
            logits, without the training-time logit adjustment.
        patch_features (`torch.FloatTensor` of shape `(B, 49, vision_hidden)`): ResNet patch features P.
        visual_states (`torch.FloatTensor` of shape `(B, 49, fusion_output_size)`): Fused states V (decoder memory).
        knowledge_states (`torch.FloatTensor` of shape `(num_nodes, knowledge_hidden_size)`): Knowledge states K.
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    cls_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cls_logits: torch.FloatTensor | None = None
    patch_features: torch.FloatTensor | None = None
    visual_states: torch.FloatTensor | None = None
    knowledge_states: torch.FloatTensor | None = None


@dataclass
class KifFindings(ModelOutput):
    r"""
    Findings predicted by the diagnosis classifier.

    Args:
        states (`torch.LongTensor` of shape `(B, num_observations)`): State code per observation
            (0 blank, 1 positive, 2 negative, 3 uncertain).
        probabilities (`torch.FloatTensor` of shape `(B, num_observations, num_states)`): Softmax over states.
    """

    states: torch.LongTensor | None = None
    probabilities: torch.FloatTensor | None = None


@dataclass
class KifGenerateOutput(ModelOutput):
    r"""
    Output of [`KifForConditionalGeneration.generate`] with `return_dict_in_generate=True`.

    Args:
        sequences (`torch.LongTensor` of shape `(B * num_return_sequences, L)`): Prompt followed by the report.
        findings ([`KifFindings`]): The predicted findings that formed each prompt.
        decoder_output: The text decoder's own generate output (scores, beam indices, ...).
    """

    sequences: torch.LongTensor | None = None
    findings: KifFindings | None = None
    decoder_output: ModelOutput | None = None


@dataclass
class KifEncoderOutput(ModelOutput):
    """Everything the decoder and the classifier need, computed once per batch (shapes as in [`KifOutput`])."""

    patch_features: torch.FloatTensor | None = None
    visual_states: torch.FloatTensor | None = None
    knowledge_states: torch.FloatTensor | None = None
    cls_logits: torch.FloatTensor | None = None


def sinusoidal_position_codes(num_positions: int, width: int) -> torch.Tensor:
    """The Transformer's sine/cosine position table (num_positions, width)."""
    position = torch.arange(num_positions, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(num_positions, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


def knowledge_attention_mask(groups: list[int], labels: list[int], global_node: int) -> torch.Tensor:
    """(N, N) bool mask, True where node i may NOT attend to node j.

    Node i sees node j iff either is the global node, or they share an organ group, or they share a label.
    """
    groups_t, labels_t = torch.tensor(groups), torch.tensor(labels)
    visible = (groups_t[:, None] == groups_t[None, :]) | (labels_t[:, None] == labels_t[None, :])
    visible[global_node, :] = True
    visible[:, global_node] = True
    return ~visible


class KifKnowledgeEncoder(nn.Module):
    """Knowledge Integration (KIF): node embeddings + group position code -> masked transformer -> K (N, H).

    The original embedded node *names* with a 31k-row word table and averaged word pieces by hard-coded positions;
    here each node owns one embedding row (initialise it from word pieces with `init_node_embeddings_from_text`).
    """

    def __init__(self, config: KifConfig):
        super().__init__()
        self.config = config
        width = config.knowledge_hidden_size
        self.node_embeddings = nn.Embedding(config.num_knowledge_nodes, width)
        self.embedding_norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            width,
            config.knowledge_num_heads,
            config.knowledge_intermediate_size,
            config.dropout,
            activation="relu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, config.knowledge_num_layers, norm=nn.LayerNorm(width), enable_nested_tensor=False
        )
        # Constant, derived from the config: rebuilt in `_init_weights`, never saved.
        self.register_buffer("group_position_codes", self.build_group_position_codes(), persistent=False)
        self.register_buffer("attention_blocked", self.build_attention_mask(), persistent=False)

    def build_group_position_codes(self) -> torch.Tensor:
        table = sinusoidal_position_codes(self.config.knowledge_max_groups, self.config.knowledge_hidden_size)
        return table[torch.tensor(self.config.knowledge_node_groups)]  # (N, H)

    def build_attention_mask(self) -> torch.Tensor:
        config = self.config
        return knowledge_attention_mask(
            config.knowledge_node_groups, config.knowledge_node_labels, config.knowledge_global_node
        )

    def forward(self) -> torch.Tensor:
        nodes = self.node_embeddings.weight + self.group_position_codes.to(self.node_embeddings.weight.dtype)
        nodes = self.dropout(self.embedding_norm(nodes)).unsqueeze(0)  # (1, N, H)
        return self.encoder(nodes, mask=self.attention_blocked).squeeze(0)  # (N, H)


class KifFeedForward(nn.Sequential):
    """Position-wise feed-forward block: Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, width))


class KifFusionLayer(nn.Module):
    """Pre-norm cross-attention from image patches (queries) to knowledge states (keys/values), then feed-forward."""

    def __init__(self, config: KifConfig):
        super().__init__()
        width = config.knowledge_hidden_size
        self.attention_norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, config.fusion_num_heads, config.dropout, batch_first=True)
        self.feed_forward_norm = nn.LayerNorm(width)
        self.feed_forward = KifFeedForward(width, config.fusion_intermediate_size, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, patches: torch.Tensor, knowledge: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(self.attention_norm(patches), knowledge, knowledge, need_weights=False)
        patches = patches + self.dropout(attended)
        return patches + self.dropout(self.feed_forward(self.feed_forward_norm(patches)))


class KifCrossModalFusion(nn.Module):
    """Cross-modal semantic fusion: P (B,49,Hv) + K (N,Hk) -> fused visual states V (B,49,fusion_output_size)."""

    def __init__(self, config: KifConfig):
        super().__init__()
        width = config.knowledge_hidden_size
        self.patch_projection = nn.Linear(config.vision_hidden_size, width)
        self.layers = nn.ModuleList(KifFusionLayer(config) for _ in range(config.fusion_num_layers))
        self.norm = nn.LayerNorm(width)
        self.output_mlp = nn.Sequential(
            nn.Linear(width, config.fusion_intermediate_size),
            nn.ReLU(),
            nn.Linear(config.fusion_intermediate_size, config.fusion_output_size),
        )

    def forward(self, patch_features: torch.Tensor, knowledge_states: torch.Tensor) -> torch.Tensor:
        hidden = self.patch_projection(patch_features)  # (B, 49, Hk)
        knowledge = knowledge_states.unsqueeze(0).expand(hidden.shape[0], -1, -1)  # (B, N, Hk), no copy
        for layer in self.layers:
            hidden = layer(hidden, knowledge)
        return self.output_mlp(self.norm(hidden))  # (B, 49, fusion_output_size)


class KifDetrDecoderLayer(nn.Module):
    """DETR's post-norm decoder layer. Written out because the query position is added to the queries (and keys of
    self-attention) only, which neither torch's `nn.TransformerDecoderLayer` nor a stable transformers API offers.
    Attribute names follow DETR so original checkpoints map one to one."""

    def __init__(self, width: int, num_heads: int, hidden: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, num_heads, dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(width, num_heads, dropout, batch_first=True)
        self.linear1 = nn.Linear(width, hidden)
        self.linear2 = nn.Linear(hidden, width)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.dropout, self.dropout1 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, target: torch.Tensor, memory: torch.Tensor, query_position: torch.Tensor) -> torch.Tensor:
        query = target + query_position
        target = self.norm1(target + self.dropout1(self.self_attn(query, query, target, need_weights=False)[0]))
        attended = self.multihead_attn(target + query_position, memory, memory, need_weights=False)[0]
        target = self.norm2(target + self.dropout2(attended))
        feed_forward = self.linear2(self.dropout(F.relu(self.linear1(target))))
        return self.norm3(target + self.dropout3(feed_forward))


class KifDetrDecoder(nn.Module):
    def __init__(self, config: KifConfig):
        super().__init__()
        width = config.report_embedding_dim
        self.layers = nn.ModuleList(
            KifDetrDecoderLayer(width, config.memory_num_heads, config.memory_intermediate_size, config.dropout)
            for _ in range(config.memory_num_decoder_layers)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, memory: torch.Tensor, query_position: torch.Tensor) -> torch.Tensor:
        target = torch.zeros_like(query_position)
        for layer in self.layers:
            target = layer(target, memory, query_position)
        return self.norm(target)


class KifMemoryTransformer(nn.Module):
    """PromptMRG's DETR-style transformer with one learned-position-free query: it encodes a set of report
    embeddings and decodes a single query whose position code is an image-derived vector.

    Used twice: the "poke" transformer over the disease words W (query position q = proj(g)) and the memory
    transformer over the retrieved reports M (query position q')."""

    def __init__(self, config: KifConfig):
        super().__init__()
        width = config.report_embedding_dim
        layer = nn.TransformerEncoderLayer(
            width, config.memory_num_heads, config.memory_intermediate_size, config.dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.memory_num_encoder_layers, enable_nested_tensor=False)
        self.decoder = KifDetrDecoder(config)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(tokens)  # (B, S, D)

    def decode(self, memory: torch.Tensor, query_position: torch.Tensor) -> torch.Tensor:
        return self.decoder(memory, query_position.unsqueeze(1)).squeeze(1)  # (B, D)

    def forward(self, tokens: torch.Tensor, query_position: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(tokens), query_position)


class KifPreTrainedModel(PreTrainedModel):
    config: KifConfig
    config_class = KifConfig
    base_model_prefix = "kif"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _no_split_modules = ["KifFusionLayer", "KifDetrDecoderLayer", "BlipTextLayer", "ResNetConvLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, KifKnowledgeEncoder):
            init.copy_(module.group_position_codes, module.build_group_position_codes())
            init.copy_(module.attention_blocked, module.build_attention_mask())
        elif isinstance(module, KifForConditionalGeneration):
            init.normal_(module.cls_head.weight, std=self.config.classifier_init_std)
            init.zeros_(module.cls_head.bias)
            init.normal_(module.disease_word_embeds, std=self.config.report_embedding_dim**-0.5)
            init.ones_(module.base_probs)
            init.zeros_(module.report_memory_keys)
            init.zeros_(module.report_memory_values)


class KifForConditionalGeneration(KifPreTrainedModel, GenerationMixin):
    r"""
    KIF-ISD: knowledge-graph fusion, diagnosis prompts and a BERT decoder for chest X-ray report generation.

    Retrieved-report memory (`memory_embeds`, (B, k, D)) may be passed explicitly (as in training, from the data
    set's `clip_indices`); otherwise the model retrieves it from its own report-memory index (see
    [`~KifForConditionalGeneration.set_report_memory`]), so a saved model can generate from a bare image.
    """

    _tied_weights_keys = {
        "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
        "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    }

    def __init__(self, config: KifConfig):
        super().__init__(config)
        self.vision_model = ResNetModel(config.vision_config)
        self.knowledge_encoder = KifKnowledgeEncoder(config)
        self.fusion = KifCrossModalFusion(config)
        self.vision_proj = nn.Linear(config.vision_hidden_size, config.report_embedding_dim)
        self.poke = KifMemoryTransformer(config)
        self.memory = KifMemoryTransformer(config)
        self.cls_head = nn.Linear(
            config.vision_hidden_size + config.report_embedding_dim, config.num_states * config.num_observations
        )
        self.text_decoder = BlipTextLMHeadModel(config.text_config)

        # Text embeddings of the disease words (W) and the positive-class priors of the logit adjustment.
        self.register_buffer("disease_word_embeds", torch.empty(config.num_disease_words, config.report_embedding_dim))
        self.register_buffer("base_probs", torch.ones(config.num_observations))
        # Report-memory index: one image key (a global image feature) and one report embedding per training report.
        self.register_buffer("report_memory_keys", torch.zeros(config.report_memory_size, config.vision_hidden_size))
        self.register_buffer(
            "report_memory_values", torch.zeros(config.report_memory_size, config.report_embedding_dim)
        )
        # Image-independent states reused across calls in inference (see `image_independent_states`).
        self._constant_states_cache = None
        # `save_pretrained` records the `AutoModel` entry of `auto_map` itself; add the task-specific Auto class too.
        model_class = f"{__name__.split('.')[-1]}.{type(self).__name__}"
        config.auto_map = {**(getattr(config, "auto_map", None) or {}), "AutoModelForImageTextToText": model_class}

        self.post_init()
        self.generation_config = GenerationConfig(
            bos_token_id=config.text_config.bos_token_id,
            eos_token_id=config.text_config.sep_token_id,
            pad_token_id=config.text_config.pad_token_id,
            **GENERATION_PRESETS["mimic_cxr"],
        )

    def get_input_embeddings(self):
        return self.text_decoder.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.text_decoder.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.text_decoder.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.text_decoder.set_output_embeddings(new_embeddings)

    # ------------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------------
    def _compute_image_independent_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        knowledge_states = self.knowledge_encoder()  # (N, Hk)
        disease_words = self.poke.encode(self.disease_word_embeds.unsqueeze(0))  # (1, 20, D)
        return knowledge_states, disease_words

    def image_independent_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Knowledge states K (N, Hk) and the poke encoder's disease-word states (1, 20, D).

        Neither depends on the image. They are computed once per forward call, and in inference (eval mode, no
        gradient) once for as long as the weights, device and dtype stay the same.
        """
        if self.training or torch.is_grad_enabled():
            return self._compute_image_independent_states()
        parameters = list(self.knowledge_encoder.parameters()) + list(self.poke.encoder.parameters())
        key = (
            tuple(parameter._version for parameter in parameters),
            self.disease_word_embeds._version,
            self.disease_word_embeds.device,
            parameters[0].dtype,
        )
        if self._constant_states_cache is None or self._constant_states_cache[0] != key:
            self._constant_states_cache = (key, self._compute_image_independent_states())
        return self._constant_states_cache[1]

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ResNet features: patches P (B, h*w, Hv) and the global feature g (B, Hv)."""
        feature_map = self.vision_model(pixel_values).last_hidden_state  # (B, Hv, h, w)
        patches = feature_map.flatten(2).transpose(1, 2)  # (B, h*w, Hv)
        return patches, patches.mean(dim=1)

    def retrieve_memory(self, global_features: torch.Tensor) -> torch.Tensor:
        """The k report embeddings (B, k, D) whose image keys are most cosine-similar to each image's feature."""
        if self.config.report_memory_size == 0:
            raise ValueError(
                "No retrieved-report memory: pass `memory_embeds` of shape (batch, num_retrieved_reports, "
                "report_embedding_dim) - e.g. from a data set's `clip_indices` and `clip_text_features.json` - or "
                "give the model a report-memory index with `set_report_memory(image_keys, report_embeddings)` "
                "(run_train.py builds one from the training set)."
            )
        queries = F.normalize(global_features.float(), dim=-1)
        keys = F.normalize(self.report_memory_keys.float(), dim=-1)
        k = min(self.config.num_retrieved_reports, self.config.report_memory_size)
        nearest = (queries @ keys.T).topk(k, dim=-1).indices  # (B, k)
        return self.report_memory_values[nearest].to(global_features.dtype)

    @torch.no_grad()
    def set_report_memory(self, image_keys: torch.Tensor, report_embeddings: torch.Tensor) -> None:
        """Install a report-memory index: `image_keys` (N, vision_hidden) - global image features, e.g. from
        `encode_image` on the training images - and `report_embeddings` (N, D) of their reports. It is saved with
        the weights and used whenever `memory_embeds` is not passed."""
        if image_keys.ndim != 2 or image_keys.shape[1] != self.config.vision_hidden_size:
            raise ValueError(
                f"image_keys must be (N, {self.config.vision_hidden_size}), got {tuple(image_keys.shape)}."
            )
        if report_embeddings.shape != (image_keys.shape[0], self.config.report_embedding_dim):
            raise ValueError(
                f"report_embeddings must be ({image_keys.shape[0]}, {self.config.report_embedding_dim}), "
                f"got {tuple(report_embeddings.shape)}."
            )
        device = self.report_memory_keys.device
        self.report_memory_keys = F.normalize(image_keys.float(), dim=-1).to(device)
        self.report_memory_values = report_embeddings.float().to(device)
        self.config.report_memory_size = image_keys.shape[0]

    @torch.no_grad()
    def init_knowledge_from_word_embeddings(self, tokenizer) -> None:
        """Set each knowledge node's embedding to the mean of its name's word-piece embeddings in the decoder's word
        table (call after loading pretrained decoder weights, e.g. bert-base-uncased)."""
        word_embeddings = self.get_input_embeddings().weight
        if word_embeddings.shape[1] != self.config.knowledge_hidden_size:
            raise ValueError(
                f"Word embeddings are {word_embeddings.shape[1]} wide but knowledge_hidden_size is "
                f"{self.config.knowledge_hidden_size}; node embeddings cannot be initialised from them."
            )
        for node, name in enumerate(self.config.knowledge_node_names):
            piece_ids = tokenizer(name, add_special_tokens=False)["input_ids"]
            self.knowledge_encoder.node_embeddings.weight[node] = word_embeddings[piece_ids].mean(dim=0)

    def _check_memory(self, memory_embeds: torch.Tensor, batch_size: int) -> None:
        expected = (batch_size, self.config.report_embedding_dim)
        if memory_embeds.ndim != 3 or (memory_embeds.shape[0], memory_embeds.shape[2]) != expected:
            raise ValueError(
                f"memory_embeds must be (batch={batch_size}, k, {self.config.report_embedding_dim}), "
                f"got {tuple(memory_embeds.shape)}."
            )

    def encode(self, pixel_values: torch.Tensor, memory_embeds: torch.Tensor | None = None) -> KifEncoderOutput:
        """Image, knowledge and memory encoding up to the classifier logits: everything except the text decoder."""
        knowledge_states, disease_words = self.image_independent_states()
        patches, global_features = self.encode_image(pixel_values)
        visual_states = self.fusion(patches, knowledge_states)

        if memory_embeds is None:
            memory_embeds = self.retrieve_memory(global_features)
        self._check_memory(memory_embeds, pixel_values.shape[0])
        query = self.vision_proj(global_features)  # q (B, D)
        poked_query = self.poke.decode(disease_words.expand(query.shape[0], -1, -1), query)  # q' (B, D)
        memory_query = poked_query if self.training or self.config.use_poke_at_inference else query
        memory_summary = self.memory(memory_embeds.to(query.dtype), memory_query)  # h (B, D)

        cls_logits = self.cls_head(torch.cat([global_features, memory_summary], dim=-1))
        cls_logits = cls_logits.view(-1, self.config.num_states, self.config.num_observations)  # (B, 4, 18)
        return KifEncoderOutput(
            patch_features=patches,
            visual_states=visual_states,
            knowledge_states=knowledge_states,
            cls_logits=cls_logits,
        )

    def classification_loss(self, cls_logits: torch.Tensor, disease_labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the 4 states with logit adjustment: log(base_probs) added to the positive logits, so
        rare findings are not drowned by frequent ones. Entries labelled -100 (e.g. auxiliary observations of
        14-label rows) are ignored; a batch with no labelled entry gives 0."""
        adjustment = torch.zeros_like(cls_logits)
        adjustment[:, POSITIVE_STATE] = self.base_probs.clamp_min(MIN_BASE_PROB).log().to(cls_logits.dtype)
        if not (disease_labels != IGNORE_INDEX).any():
            return cls_logits.sum() * 0.0
        return F.cross_entropy(cls_logits + adjustment, disease_labels, ignore_index=IGNORE_INDEX)

    # ------------------------------------------------------------------------------------------------
    # Training forward
    # ------------------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        disease_labels: torch.LongTensor | None = None,
        memory_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> KifOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): Images from [`KifImageProcessor`].
        input_ids (`torch.LongTensor` of shape `(B, L)`): `[DEC] s_1 .. s_18 report [SEP] [PAD]..` from
            [`KifProcessor`]. Without it only the encoder and classifier run (`logits` is None).
        attention_mask (`torch.LongTensor` of shape `(B, L)`): 1 for real tokens, 0 for padding.
        labels (`torch.LongTensor` of shape `(B, L)`): `input_ids` with prompt and padding set to -100.
        disease_labels (`torch.LongTensor` of shape `(B, num_observations)`): State codes 0..3, -100 to ignore.
        memory_embeds (`torch.FloatTensor` of shape `(B, k, D)`): Retrieved report embeddings; if omitted, the
            model's report-memory index is used.
        """
        encoded = self.encode(pixel_values, memory_embeds)
        logits = lm_loss = cls_loss = None
        if input_ids is not None:
            decoded = self.text_decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=encoded.visual_states,
                labels=labels,
                use_cache=False,
                **kwargs,
            )
            logits, lm_loss = decoded.logits, decoded.loss
        if disease_labels is not None:
            cls_loss = self.classification_loss(encoded.cls_logits, disease_labels)
        terms = [
            term
            for term in (lm_loss, None if cls_loss is None else self.config.classification_loss_weight * cls_loss)
            if term is not None
        ]
        return KifOutput(
            loss=sum(terms) if terms else None,
            lm_loss=lm_loss,
            cls_loss=cls_loss,
            logits=logits,
            cls_logits=encoded.cls_logits,
            patch_features=encoded.patch_features,
            visual_states=encoded.visual_states,
            knowledge_states=encoded.knowledge_states,
        )

    # ------------------------------------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------------------------------------
    @staticmethod
    def findings_from_logits(cls_logits: torch.Tensor) -> KifFindings:
        probabilities = cls_logits.float().softmax(dim=1).transpose(1, 2)  # (B, 18, 4)
        return KifFindings(states=probabilities.argmax(dim=-1), probabilities=probabilities)

    @torch.no_grad()
    def predict_findings(self, pixel_values: torch.Tensor, memory_embeds: torch.Tensor | None = None) -> KifFindings:
        """State (0 blank, 1 positive, 2 negative, 3 uncertain) and state probabilities of every observation."""
        return self.findings_from_logits(self.encode(pixel_values, memory_embeds).cls_logits)

    def build_prompt_ids(self, states: torch.LongTensor) -> torch.LongTensor:
        """`[DEC] s_1 .. s_n` token ids (B, 1 + n) for finding states (B, n)."""
        state_token_ids = torch.tensor(self.config.state_token_ids, device=states.device)
        start = torch.full_like(states[:, :1], self.config.text_config.bos_token_id)
        return torch.cat([start, state_token_ids[states]], dim=1)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        memory_embeds: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        return_dict_in_generate: bool = False,
        **kwargs,
    ) -> torch.LongTensor | KifGenerateOutput:
        r"""
        Predict the findings, build each image's diagnosis prompt and decode the report with the KV cache.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): Images.
            memory_embeds (`torch.FloatTensor` of shape `(B, k, D)`, *optional*): Retrieved report embeddings;
                defaults to retrieval from the model's report-memory index.
            generation_config ([`GenerationConfig`], *optional*): Defaults to `self.generation_config` (beam search
                with 3 beams and the MIMIC-CXR lengths unless the saved model says otherwise).
            return_dict_in_generate (`bool`): Return a [`KifGenerateOutput`] with the findings too.
            kwargs: Generation parameters overriding `generation_config` (`num_beams`, `do_sample`,
                `max_new_tokens`, ...). Encoder states are expanded for beams by `generate` itself.

        Returns:
            `torch.LongTensor` of shape `(B * num_return_sequences, 1 + num_observations + new_tokens)`: prompt and
            report tokens; decode with [`KifProcessor.batch_decode`], which drops the prompt.
        """
        generation_config = copy.deepcopy(generation_config or self.generation_config)
        model_kwargs = generation_config.update(**kwargs, return_dict_in_generate=True)
        encoded = self.encode(pixel_values, memory_embeds)
        findings = self.findings_from_logits(encoded.cls_logits)
        prompt_ids = self.build_prompt_ids(findings.states)
        decoder_output = self.text_decoder.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            encoder_hidden_states=encoded.visual_states,
            generation_config=generation_config,
            **model_kwargs,
        )
        if not return_dict_in_generate:
            return decoder_output.sequences
        return KifGenerateOutput(sequences=decoder_output.sequences, findings=findings, decoder_output=decoder_output)

    def train(self, mode: bool = True):
        self._constant_states_cache = None
        return super().train(mode)


KifForConditionalGeneration.register_for_auto_class("AutoModel")
AutoModel.register(KifConfig, KifForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(KifConfig, KifForConditionalGeneration, exist_ok=True)

__all__ = ["KifForConditionalGeneration", "KifPreTrainedModel"]
