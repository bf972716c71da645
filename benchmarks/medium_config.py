"""The medium random configuration every benchmark uses (HF config.json keys)."""

MEDIUM = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=512, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=4, head_dim=64, num_local_experts=64, num_experts_per_tok=8, rotary_dim=32,
    bos_token_id=None, eos_token_id=None,
)
