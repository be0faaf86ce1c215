"""The cache of a LayAlign model: the LLM's own cache, and the fused keys and values of every adapted layer.

The pair is a transformers `EncoderDecoderCache`, as encoder-decoder models keep their cross-attention states: its
self-attention half is the LLM's cache (dynamic, static, sliding, as `generate` chose), its cross-attention half
holds one layer per adapted LLM layer, indexed by the layer's position among the adapted layers. The first pass of a
generation fills it (each adapted layer projects its own fused sources inside its own forward, where sharded training
holds the layer's weights whole) and marks it in `is_updated`; every later step reads it. Beam search reorders both
halves through the stock `reorder_cache`; assisted and prompt-lookup decoding crop the LLM's half (the fused states do
not grow with the text).

The LLM's half holds `[BOS, mapped encoder tokens, boundary]` in front of the text: a cache handed back to `generate`
to continue a generation holds `num_prefix_positions` more positions than the text it has read, which
[`check_cache_to_continue`] checks before any step.
"""

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache, StaticLayer


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


class FusedStatesCache(DynamicCache):
    """The dynamic cross-attention half: one [`FusedStatesLayer`] per adapted layer. A `DynamicCache`, which is what
    `EncoderDecoderCache` asks of both halves before it crops or repeats them (assisted decoding, contrastive search)."""

    def __init__(self, num_adapted_layers: int):
        Cache.__init__(self, layers=[FusedStatesLayer() for _ in range(num_adapted_layers)])


def with_fused_states_cache(llm_cache: Cache, num_adapted_layers: int, encoder_len: int) -> EncoderDecoderCache:
    """Pairs `llm_cache` with an empty cache for the fused keys and values of `num_adapted_layers` layers.

    Next to a compileable (static) LLM cache the fused states get static layers of the encoder's length, so that a
    compiled decoding step reads tensors of fixed address and shape.
    """
    if llm_cache.is_compileable:
        layers = [StaticLayer(max_cache_len=encoder_len) for _ in range(num_adapted_layers)]
        return EncoderDecoderCache(llm_cache, Cache(layers=layers))
    return EncoderDecoderCache(llm_cache, FusedStatesCache(num_adapted_layers))


def cache_for_pass(
    cache: Cache | None, use_cache: bool | None, text_config, num_adapted_layers: int, encoder_len: int
) -> Cache | None:
    """The cache of one forward pass of a model whose fusion has `num_adapted_layers` adapted layers (0 in MindMerger
    mode, which keeps the LLM's own cache): `cache` as it is when it already pairs both halves, or paired with an
    empty cache for the fused keys and values (a plain LLM cache passed, or `use_cache=True` without a cache)."""
    if not num_adapted_layers or isinstance(cache, EncoderDecoderCache):
        return cache
    if cache is None and not use_cache:
        return None
    llm_cache = cache if cache is not None else DynamicCache(config=text_config)
    return with_fused_states_cache(llm_cache, num_adapted_layers, encoder_len)


def check_cache_to_continue(
    cache: object,
    *,
    batch_size: int,
    text_len: int,
    num_prefix_positions: int,
    num_llm_layers: int,
    num_adapted_layers: int,
    encoder_len: int,
) -> None:
    """Refuses a cache handed to `generate` that cannot hold this call's past: it must be what an earlier call on the
    same source returned (`past_key_values` of its output), before the tokens that call generated.

    Args:
        cache: the cache passed to `generate` (an empty one is a cache to fill, and always fits).
        batch_size: rows of `input_ids` (and of the encoder inputs).
        text_len: the text's length, `input_ids` (or its attention mask, when only the new tokens are passed).
        num_prefix_positions: length of `[BOS, mapped encoder tokens, boundary]` for this call's source.
        num_llm_layers: the LLM's decoder layers, one cache layer each.
        num_adapted_layers: the adapted layers (0 in MindMerger mode), one cross-attention cache layer each.
        encoder_len: the source's length, in encoder tokens.
    """
    if not isinstance(cache, Cache):
        raise ValueError(
            f"`cache` must be a transformers `Cache` (the `past_key_values` of an earlier `generate` output), got "
            f"{type(cache).__name__}."
        )
    past_len = int(cache.get_seq_length())
    if past_len == 0:
        return
    continue_with = "pass the `past_key_values` that `generate` returned for these same inputs"
    if num_adapted_layers:
        cross = cache.cross_attention_cache if isinstance(cache, EncoderDecoderCache) else None
        if cross is None or len(cross.layers) != num_adapted_layers or not cross.layers[0].is_initialized:
            raise ValueError(
                f"`cache` holds {past_len} positions but no fused keys and values of this model's "
                f"{num_adapted_layers} adapted layers: {continue_with}."
            )
        if (cross_len := cross.layers[0].keys.shape[-2]) != encoder_len:
            raise ValueError(
                f"`cache` holds the fused keys and values of a source of {cross_len} encoder tokens, but "
                f"`encoder_input_ids` holds {encoder_len}: {continue_with}."
            )
    llm_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    if len(llm_cache.layers) != num_llm_layers:
        raise ValueError(f"`cache` has {len(llm_cache.layers)} layers but the LLM has {num_llm_layers}: {continue_with}.")
    rows = next(layer.keys.shape[0] for layer in llm_cache.layers if layer.is_initialized)
    if rows != batch_size:
        raise ValueError(f"`cache` holds {rows} sequences but `input_ids` holds {batch_size}: {continue_with}.")
    if not num_prefix_positions <= past_len < num_prefix_positions + text_len:
        raise ValueError(
            f"`cache` holds {past_len} positions; continuing needs `[BOS, mapped source, boundary]` "
            f"({num_prefix_positions} positions for a source of {encoder_len} encoder tokens) followed by fewer "
            f"than the {text_len} text tokens of `input_ids`: {continue_with}, and `input_ids` that extend its "
            "sequences."
        )
