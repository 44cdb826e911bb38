"""Write `configs/kif-tiny/`: a tiny KIF-ISD configuration, its processor and a small WordPiece tokenizer.

The same code as the full model runs at toy sizes (a 4-stage ResNet of width 16..128, a 2-layer 64-wide
decoder, 128x128 crops), fast enough for tests and for the CPU demo that `run_train.py` runs by default.

    python configs/make_kif_tiny.py            # rewrites configs/kif-tiny/
"""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configuration_kif import KifConfig  # noqa: E402
from processing_kif import KifImageProcessor, KifProcessor, train_report_tokenizer  # noqa: E402


OUTPUT_DIR = Path(__file__).resolve().parent / "kif-tiny"
VOCAB_SIZE = 600
# A small corpus of chest X-ray report language (R2Gen-cleaned style) from which the WordPiece vocabulary is
# learnt; words outside it still tokenise, into word pieces and letters.
REPORT_CORPUS = """
the heart size is normal . the lungs are clear . there is no pleural effusion or pneumothorax .
the cardiomediastinal silhouette is within normal limits . no focal consolidation is seen .
heart size is mildly enlarged . there is moderate cardiomegaly . the heart is enlarged .
small left pleural effusion . small right pleural effusion . bilateral pleural effusions are present .
there is a large right pneumothorax . a small left apical pneumothorax is noted . no pneumothorax .
patchy opacity in the right lower lobe may represent atelectasis or pneumonia . focal airspace opacity .
left lower lobe opacity concerning for pneumonia . possible small effusion . cannot exclude pneumonia .
a right internal jugular central venous catheter terminates in the svc . endotracheal tube is in place .
a left chest wall pacemaker is present with leads in the right atrium and ventricle . nasogastric tube .
no acute cardiopulmonary process . no acute osseous abnormality . the osseous structures are intact .
mild pulmonary edema . pulmonary vascular congestion . interstitial markings are prominent .
there is blunting of the left costophrenic angle . the mediastinum is not widened . no free air .
lung volumes are low . bibasilar atelectasis . compared to the prior study there is no significant change .
degenerative changes of the thoracic spine . healed rib fractures . a displaced fracture is seen .
the pulmonary nodule is unchanged . lung lesion . mass . emphysema . hyperinflated lungs . scoliosis .
hiatal hernia . calcified granuloma . aortic calcification . tortuous aorta . support device . stable .
unremarkable . well expanded . likely . probably . questionable . suggestive of . consistent with . versus .
quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 x y z q j k w v , : ; ( ) / - %
"""
TINY_CONFIG = {
    "vision_config": {
        "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "layer_type": "bottleneck",
    },
    "text_config": {
        "hidden_size": 64, "encoder_hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 256, "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "label_smoothing": 0.1,
    },
    "knowledge_hidden_size": 32, "knowledge_num_heads": 2, "knowledge_intermediate_size": 64,
    "fusion_num_heads": 2, "fusion_intermediate_size": 64, "fusion_output_size": 128,
    "report_embedding_dim": 64, "memory_num_heads": 2, "memory_intermediate_size": 128,
    "memory_num_encoder_layers": 1, "memory_num_decoder_layers": 1,
}  # fmt: skip
TINY_IMAGES = {"size": 144, "crop_size": 128}
TINY_GENERATION = {"num_beams": 3, "min_new_tokens": 0, "max_new_tokens": 60}


def make_tiny(output_dir: Path = OUTPUT_DIR) -> KifProcessor:
    tokenizer = train_report_tokenizer(REPORT_CORPUS.strip().splitlines(), vocab_size=VOCAB_SIZE)
    processor = KifProcessor(KifImageProcessor(**TINY_IMAGES), tokenizer)
    text_config = dict(TINY_CONFIG["text_config"])
    text_config.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = KifConfig(**{**TINY_CONFIG, "text_config": text_config}, state_token_ids=processor.state_token_ids)
    config.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    from modeling_kif import KifForConditionalGeneration

    generation_config = KifForConditionalGeneration(config).generation_config
    generation_config.update(**TINY_GENERATION)
    generation_config.save_pretrained(output_dir)
    # The project's modules are imported, not copied: copies of the code here would go stale.
    for code_file in output_dir.glob("*_kif.py"):
        code_file.unlink()
    return processor


if __name__ == "__main__":
    make_tiny()
    print(f"wrote {OUTPUT_DIR}")
