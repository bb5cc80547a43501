"""The model config and prompts of the sharding tests (tests/parallel), shared with the
multi-host worker process: 8 query heads and 4 KV heads, so heads split on a model axis of
2 or 4 and KV heads are replicated on 8; a vocabulary of 64 splits on any axis."""

from efficient.models import ModelConfig

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=8,
                     num_kv_heads=4, head_dim=8, pad_token_id=0)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13], [3, 4, 3, 4]]
