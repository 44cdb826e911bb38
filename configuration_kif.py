"""KIF-ISD model configuration.

`KifConfig()` is the full-size model of the paper: a ResNet-101 image encoder, the 28-node chest
knowledge graph, cross-modal fusion to 2048-wide visual states, PromptMRG's disease-word "poke" and
retrieved-report memory, the 4-state x 18-observation diagnosis classifier, and a 12-layer BERT-base
decoder (BLIP's text decoder) that cross-attends to the fused visual states.

This file is shipped with saved models as custom code: it imports nothing from training-only code.
"""

from transformers import AutoConfig, BlipTextConfig, PreTrainedConfig, ResNetConfig
from transformers.configuration_utils import SubConfigSpec


# The 14 CheXpert observations, in the order used by CheXbert, PromptMRG and KIF-ISD label files.
CHEXPERT_OBSERVATIONS = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)
# The 5 observations commonly reported separately (CheXpert competition set).
CHEXPERT_5_OBSERVATIONS = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
# PromptMRG's training labels have 4 more columns after the 14 CheXpert ones; the public code does not
# name them. We name them after knowledge-graph findings that CheXpert lacks (used by the synthetic data).
AUXILIARY_OBSERVATIONS = ("Emphysema", "Scoliosis", "Hernia", "Calcinosis")

# Label coding of every annotation file, and the prompt token of each state (index = code).
FINDING_STATES = ("blank", "positive", "negative", "uncertain")
STATE_TOKENS = ("[BLA]", "[POS]", "[NEG]", "[UNC]")
DECODER_START_TOKEN = "[DEC]"

# The chest knowledge graph of Zhang et al. (AAAI 2020) as used by DCL and KIF-ISD: a global node,
# then organs followed by their findings. `group` indexes the sinusoidal position code; nodes of one
# organ share a group; all organs share one label and each organ's findings share another.
_GLOBAL, _ORGAN = 0, 1
KNOWLEDGE_GRAPH = (
    # (name, group, label)
    ("global", 0, 0),
    ("normal", 1, 2),
    ("other finding", 2, 3),
    ("heart", 3, _ORGAN),
    ("cardiomegaly", 3, 4),
    ("spine", 4, _ORGAN),
    ("scoliosis", 4, 5),
    ("pleural", 5, _ORGAN),
    ("effusion", 5, 6),
    ("thickening", 5, 6),
    ("pneumothorax", 5, 6),
    ("bone", 6, _ORGAN),
    ("bone fractures", 6, 7),
    ("lung", 7, _ORGAN),
    ("emphysema", 7, 8),
    ("pneumonia", 7, 8),
    ("edema", 7, 8),
    ("atelectasis", 7, 8),
    ("cicatrix", 7, 8),
    ("opacity", 7, 8),
    ("lesion", 7, 8),
    ("mediastinum", 8, _ORGAN),
    ("hernia", 8, 9),
    ("calcinosis", 8, 9),
    ("foreign object", 9, 10),
    ("airspace", 10, _ORGAN),
    ("airspace disease", 10, 11),
    ("hypoinflation", 10, 11),
)

# The 20 finding names whose text embeddings form the disease-word memory of the "poke" transformer.
DISEASE_WORDS = (
    "normal", "cardiomegaly", "scoliosis", "fractures", "effusion", "thickening", "pneumothorax",
    "hernia", "calcinosis", "emphysema", "pneumonia", "edema", "atelectasis", "cicatrix", "opacity",
    "lesion", "airspace disease", "hypoinflation", "medical device", "other",
)  # fmt: skip

# Generation lengths of the two data sets (new tokens after the 19-token diagnosis prompt).
GENERATION_PRESETS = {
    "mimic_cxr": {"num_beams": 3, "min_new_tokens": 100, "max_new_tokens": 150},
    "iu_xray": {"num_beams": 3, "min_new_tokens": 60, "max_new_tokens": 110},
}

# Full-size sub-model defaults: torchvision-style ResNet-101 (stride in the 3x3 conv, "v1.5") and
# bert-base-uncased sizes with cross-attention to the 2048-wide fused visual states.
RESNET_101 = {"depths": [3, 4, 23, 3], "hidden_sizes": [256, 512, 1024, 2048], "layer_type": "bottleneck"}
BERT_BASE_DECODER = {
    "vocab_size": 30527,  # bert-base-uncased (30522) + [DEC] [BLA] [POS] [NEG] [UNC]
    "hidden_size": 768,
    "encoder_hidden_size": 2048,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 512,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "layer_norm_eps": 1e-12,
    "label_smoothing": 0.1,
    "bos_token_id": 30522,
    "eos_token_id": 102,
    "sep_token_id": 102,
    "pad_token_id": 0,
}


class KifConfig(PreTrainedConfig):
    r"""
    Configuration of [`KifForConditionalGeneration`]. The defaults give the full-size model of the paper.

    Args:
        vision_config (`ResNetConfig` or `dict`):
            The image encoder. Its last hidden size is the patch/global feature width (2048 for ResNet-101).
        text_config (`BlipTextConfig` or `dict`):
            The text decoder (BERT-base sizes). `encoder_hidden_size` must equal `fusion_output_size`.
        knowledge_node_names (`list[str]`):
            Names of the knowledge-graph nodes (28). Used to initialise node embeddings from word pieces.
        knowledge_node_groups (`list[int]`):
            Organ group of each node; indexes the sinusoidal position code. Nodes of a group see each other.
        knowledge_node_labels (`list[int]`):
            Label of each node; nodes sharing a label see each other.
        knowledge_global_node (`int`):
            Index of the global node, which sees and is seen by every node.
        knowledge_hidden_size (`int`): Width of node embeddings and knowledge states (768).
        knowledge_num_layers (`int`): Layers of the masked pre-norm knowledge transformer (2).
        knowledge_num_heads (`int`): Its attention heads (6).
        knowledge_intermediate_size (`int`): Its feed-forward width (1024).
        knowledge_max_groups (`int`): Rows of the sinusoidal group code (20, as the original).
        fusion_num_layers (`int`): Pre-norm image-to-knowledge cross-attention layers (2).
        fusion_num_heads (`int`): Their attention heads (16).
        fusion_intermediate_size (`int`): Their feed-forward width and the fusion MLP's hidden width (1024).
        fusion_output_size (`int`): Width of the fused visual states the decoder attends to (2048).
        dropout (`float`): Dropout of the knowledge, fusion, poke and memory transformers (0.1).
        report_embedding_dim (`int`): Width D of disease-word and retrieved-report embeddings (512).
        num_retrieved_reports (`int`): Number k of retrieved training reports per image (21).
        num_disease_words (`int`): Rows of the disease-word embedding buffer (20).
        memory_num_heads (`int`): Heads of the poke and memory transformers (8).
        memory_intermediate_size (`int`): Their feed-forward width (2048).
        memory_num_encoder_layers (`int`): Their encoder layers (2).
        memory_num_decoder_layers (`int`): Their decoder layers (2).
        use_poke_at_inference (`bool`):
            The original used the poke output q' only in training and the raw query q at inference; the port
            uses q' in both (`True`). Set `False` to restore the original behaviour.
        report_memory_size (`int`):
            Number N of entries in the model's own report-memory index (image keys and report embeddings saved
            with the weights, used when `memory_embeds` is not passed). 0 means no index.
        observations (`list[str]`): The 18 diagnosis observations: 14 CheXpert ones then 4 auxiliary ones.
        num_chexpert_observations (`int`): How many leading observations are CheXpert ones (14).
        state_tokens (`list[str]`): Prompt token of each finding state (blank, positive, negative, uncertain).
        decoder_start_token (`str`): Token that starts every decoder sequence ("[DEC]"); its id is
            `text_config.bos_token_id`.
        state_token_ids (`list[int]`): Vocabulary ids of `state_tokens` (bert-base-uncased + added tokens:
            30523..30526). Must match the processor's tokenizer.
        classification_loss_weight (`float`): Weight of the classifier loss in `loss` (4, as the paper).
        classifier_init_std (`float`): Std of the classifier's weight initialisation (0.001).
        initializer_range (`float`): Std of the other linear and embedding initialisations (0.02).
    """

    model_type = "kif"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(ResNetConfig, init_kwargs=RESNET_101),
        "text_config": SubConfigSpec(BlipTextConfig, init_kwargs=BERT_BASE_DECODER),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    knowledge_node_names: list[str] | None = None
    knowledge_node_groups: list[int] | None = None
    knowledge_node_labels: list[int] | None = None
    knowledge_global_node: int = 0
    knowledge_hidden_size: int = 768
    knowledge_num_layers: int = 2
    knowledge_num_heads: int = 6
    knowledge_intermediate_size: int = 1024
    knowledge_max_groups: int = 20
    fusion_num_layers: int = 2
    fusion_num_heads: int = 16
    fusion_intermediate_size: int = 1024
    fusion_output_size: int = 2048
    dropout: float = 0.1
    report_embedding_dim: int = 512
    num_retrieved_reports: int = 21
    num_disease_words: int = 20
    memory_num_heads: int = 8
    memory_intermediate_size: int = 2048
    memory_num_encoder_layers: int = 2
    memory_num_decoder_layers: int = 2
    use_poke_at_inference: bool = True
    report_memory_size: int = 0
    observations: list[str] | None = None
    num_chexpert_observations: int = len(CHEXPERT_OBSERVATIONS)
    state_tokens: list[str] | None = None
    decoder_start_token: str = DECODER_START_TOKEN
    state_token_ids: list[int] | None = None
    classification_loss_weight: float = 4.0
    classifier_init_std: float = 0.001
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.knowledge_node_names is None:
            self.knowledge_node_names = [name for name, _, _ in KNOWLEDGE_GRAPH]
            self.knowledge_node_groups = [group for _, group, _ in KNOWLEDGE_GRAPH]
            self.knowledge_node_labels = [label for _, _, label in KNOWLEDGE_GRAPH]
        if self.observations is None:
            self.observations = list(CHEXPERT_OBSERVATIONS + AUXILIARY_OBSERVATIONS)
        if self.state_tokens is None:
            self.state_tokens = list(STATE_TOKENS)
        if self.state_token_ids is None:
            first_state_id = BERT_BASE_DECODER["bos_token_id"] + 1  # added right after [DEC]
            self.state_token_ids = list(range(first_state_id, first_state_id + len(STATE_TOKENS)))
        super().__post_init__(**kwargs)
        self._check_consistency()

    def _check_consistency(self):
        num_nodes = len(self.knowledge_node_names)
        if not (len(self.knowledge_node_groups) == len(self.knowledge_node_labels) == num_nodes):
            raise ValueError(
                f"knowledge_node_names, knowledge_node_groups and knowledge_node_labels must have one entry per "
                f"node; got {num_nodes}, {len(self.knowledge_node_groups)} and {len(self.knowledge_node_labels)}."
            )
        if max(self.knowledge_node_groups) >= self.knowledge_max_groups:
            raise ValueError(
                f"knowledge_node_groups uses group {max(self.knowledge_node_groups)} but knowledge_max_groups is "
                f"{self.knowledge_max_groups}."
            )
        if not (len(self.state_tokens) == len(self.state_token_ids) == len(FINDING_STATES)):
            raise ValueError(
                f"state_tokens and state_token_ids need one entry per state {FINDING_STATES}; got "
                f"{self.state_tokens} and {self.state_token_ids}."
            )
        if self.text_config.encoder_hidden_size != self.fusion_output_size:
            raise ValueError(
                f"text_config.encoder_hidden_size ({self.text_config.encoder_hidden_size}) must equal "
                f"fusion_output_size ({self.fusion_output_size}): the decoder cross-attends to the fused states."
            )

    @property
    def num_observations(self) -> int:
        return len(self.observations)

    @property
    def num_states(self) -> int:
        return len(self.state_tokens)

    @property
    def num_knowledge_nodes(self) -> int:
        return len(self.knowledge_node_names)

    @property
    def vision_hidden_size(self) -> int:
        return self.vision_config.hidden_sizes[-1]

    @property
    def prompt_length(self) -> int:
        """Decoder-start token plus one state token per observation (19 for the full model)."""
        return 1 + self.num_observations


KifConfig.register_for_auto_class()
AutoConfig.register("kif", KifConfig, exist_ok=True)

__all__ = ["KifConfig"]
