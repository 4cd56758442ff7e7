"""The T5 v1.1 XXL text encoder, shared by the families that read it (Flux.1, SD3).

Architecture only, as a section for a family's config file to place under its tower's name
(`config.text_encoder_2 = t5.t5_xxl()` for Flux, `text_encoder_3` for SD3); the keys are
transformers' `T5Config` names, as in the checkpoints' config.json.
"""


def t5_xxl() -> dict:
    """google/t5-v1_1-xxl's encoder (transformers T5EncoderModel), 4,762,310,656 parameters
    with the tied token embedding counted once."""
    return dict(
        vocab_size=32128,  # token embedding rows: 32,000 SentencePiece pieces, 100 sentinels, 28 unused
        d_model=4096,  # token width (the denoisers' text context width)
        d_kv=64,  # width per attention head
        d_ff=10240,  # gated feed-forward hidden width
        num_layers=24,  # transformer blocks
        num_heads=64,  # attention heads per block (d_kv * num_heads = d_model here)
        relative_attention_num_buckets=32,  # relative-position buckets, half per direction
        relative_attention_max_distance=128,  # distances from here on share the last bucket
        feed_forward_proj="gated-gelu",  # T5 v1.1: gelu (tanh approximation) gate x linear
        layer_norm_epsilon=1e-6,  # RMS norm epsilon
    )
