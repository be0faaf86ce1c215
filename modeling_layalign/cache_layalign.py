"""The cache of a LayAlign model: the LLM's own cache, and the fused keys and values of every adapted layer.

The pair is a transformers `EncoderDecoderCache`, as encoder-decoder models keep their cross-attention states: its
self-attention half is the LLM's cache (dynamic, static, sliding, as `generate` chose), its cross-attention half
holds one layer per adapted LLM layer, indexed by the layer's position among the adapted layers. The first pass of a
generation fills it (each adapted layer projects its own fused sources inside its own forward, where sharded training
holds the layer's weights whole) and marks it in `is_updated`; every later step reads it. Beam search reorders both
halves through the stock `reorder_cache`.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer, EncoderDecoderCache, StaticLayer


class FusedStatesLayer(DynamicLayer):
    """One adapted layer's fused keys and values, `(batch, num_kv_heads, encoder_len, head_dim)` each.

    Written once and read at every step: `update` keeps the tensors it is given, where a `DynamicLayer` would
    allocate an empty tensor and concatenate onto it (four operators per layer and a copy, for nothing).
    """

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.device = key_states.device
        self.keys, self.values = key_states, value_states
        self.is_initialized = True
        return key_states, value_states


def with_fused_states_cache(llm_cache: Cache, num_adapted_layers: int, encoder_len: int) -> EncoderDecoderCache:
    """Pairs `llm_cache` with an empty cache for the fused keys and values of `num_adapted_layers` layers.

    Next to a compileable (static) LLM cache the fused states get static layers of the encoder's length, so that a
    compiled decoding step reads tensors of fixed address and shape.
    """
    if llm_cache.is_compileable:
        layers = [StaticLayer(max_cache_len=encoder_len) for _ in range(num_adapted_layers)]
    else:
        layers = [FusedStatesLayer() for _ in range(num_adapted_layers)]
    return EncoderDecoderCache(llm_cache, Cache(layers=layers))
