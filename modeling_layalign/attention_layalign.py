"""The fusion-enhanced attention of LayAlign, plugged into any supported LLM through `AttentionInterface`.

In every adapted LLM layer, next to the unchanged self-attention, the layer's own queries attend over keys and values
that its own frozen `k_proj` / `v_proj` project from the fused encoder states, through a separate softmax scaled by a
learned gate (Ruan et al. 2025, arXiv 2502.11405, Sec. 3.2, "adaptive fusion-enhanced attention"; reference code:
`AdaptedAttention.forward` in `peft/src/peft/tuners/layalign_prompt/layer.py`, which multiplies the fp32 softmax by
`adaption_gate` and puts no rotary embedding on the fused keys).

Where we deliberately differ from the reference code: the fused branch masks encoder padding (the reference attends
over padded encoder tokens too; a source that is all padding adds nothing), the gate scales the fused values once per
projection rather than the branch's output at every step (the same product, see `project_fused_kv`), and the
branch runs as an attention function registered with transformers' `AttentionInterface` instead of a forked peft that
stores per-batch encoder states on the attention modules. All per-batch state arrives as the keyword argument
`layalign_fused`, so beam search, `num_return_sequences`, several models and several threads never interfere.

## Adding an LLM family

An entry in `LLM_FAMILIES`, keyed by the config's `model_type`, is all a family needs, provided its attention module
(reached as `llm.get_decoder().layers[i].self_attn`) offers what the fused branch reads:

- `k_proj` and `v_proj`: the frozen projections applied to the fused encoder states;
- `head_dim`, `scaling` and `layer_idx`;
- a call of the configured attention function with queries already normed and rotated (every family in
  transformers 5 does this through `ALL_ATTENTION_FUNCTIONS`), and an `eager_attention_forward` in its modeling file
  (used when the user picks `attn_implementation="eager"`);
- and, where the family has them, a per-head key norm applied before RoPE (`k_norm`) and an attention-logit
  soft-capping value (`softcap`), named in the entry.

`tests/test_attention_layalign.py` checks these attributes for every listed family, so that a transformers upgrade
that renames one fails loudly.
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface


@dataclass(frozen=True)
class LLMAttentionFamily:
    """How the fused branch reads one LLM family's attention module.

    Every supported family names its projections `k_proj` / `v_proj`, keeps its query scaling in `scaling` and
    calls the attention function with queries already normed and rotated. What differs is listed here.

    Attributes:
        k_norm: attribute of the attention module holding the per-head key norm applied before RoPE, if any.
        softcap: attribute holding the attention-logit soft-capping value, if the family has one.
    """

    k_norm: str | None = None
    softcap: str | None = None


LLM_FAMILIES: dict[str, LLMAttentionFamily] = {
    "llama": LLMAttentionFamily(),
    "mistral": LLMAttentionFamily(),
    "qwen2": LLMAttentionFamily(),
    "qwen3": LLMAttentionFamily(k_norm="k_norm"),
    "gemma2": LLMAttentionFamily(softcap="attn_logit_softcapping"),
    "gemma3_text": LLMAttentionFamily(k_norm="k_norm", softcap="attn_logit_softcapping"),
}



def llm_family(config) -> LLMAttentionFamily:
    """Returns the attention family of an LLM config, or raises a `ValueError` naming the supported ones."""
    if config.model_type not in LLM_FAMILIES:
        raise ValueError(
            f"LayAlign does not support the LLM family {config.model_type!r}; supported: {sorted(LLM_FAMILIES)}."
        )
    return LLM_FAMILIES[config.model_type]



@dataclass
class FusedAttentionInputs:
    """What the adapted LLM layers read from the encoder during one forward pass.

    It reaches the attention function as the keyword argument `layalign_fused` and is never stored on a module.
    Each adapted layer projects its own two sources with its own frozen `k_proj` / `v_proj`, inside its own forward:
    that is where sharded training (FSDP, DeepSpeed ZeRO-3) holds the layer's weights whole, and where the reference
    code projects too. While decoding, the first pass stores the projections in `cache` and later passes read them
    there, so they are computed once per `generate`.

    Attributes:
        sources: the fusion's `2M` outputs, each `(batch * encoder_len, d_llm)` in the LLM's dtype (source `2m` feeds
            the keys of adapted layer `m`, source `2m + 1` its values); `None` when `cache` already holds the
            projections.
        value_scales: `M` tensors `(batch, encoder_len, 1, 1)`, each adapted layer's gate times the encoder mask,
            applied to the projected values (see [`project_fused_kv`]); `None` when the value sources carry them
            already, or without `sources`.
        cache: the fused keys and values of every adapted layer, indexed by slot (the cross-attention half of the
            model's `EncoderDecoderCache`), or `None` when nothing is cached (training).
        encoder_bias: `(batch, 1, 1, encoder_len)`, 0 on real encoder tokens and the dtype's minimum on padding,
            added to the fused branch's attention scores; built once per pass for every layer.
        slots: LLM layer index -> position of that layer among the adapted layers.
        family: the LLM family's attention details.
    """

    sources: tuple[torch.Tensor, ...] | None
    value_scales: tuple[torch.Tensor, ...] | None
    cache: Cache | None
    encoder_bias: torch.Tensor
    slots: dict[int, int]
    family: LLMAttentionFamily

    def keys_and_values(self, module: nn.Module, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(keys, values)` of adapted layer `slot`, each `(batch, num_kv_heads, encoder_len, head_dim)`: read from
        the cache, or projected by `module` (the layer's attention) and stored in the cache if there is one."""
        if self.sources is None:
            layer = self.cache.layers[slot]
            return layer.keys, layer.values
        value_scale = None if self.value_scales is None else self.value_scales[slot]
        encoder_shape = (self.encoder_bias.shape[0], self.encoder_bias.shape[-1])
        keys, values = project_fused_kv(
            module, self.sources[2 * slot], self.sources[2 * slot + 1], encoder_shape, value_scale, self.family
        )
        if self.cache is not None:
            keys, values = self.cache.update(keys, values, slot)
        return keys, values


def project_fused_kv(
    attention: nn.Module,
    key_source: torch.Tensor,
    value_source: torch.Tensor,
    encoder_shape: tuple[int, int],
    value_scale: torch.Tensor | None,
    family: LLMAttentionFamily,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projects one adapted layer's two fusion sources with its own frozen k/v maps: its fused keys and values.

    Args:
        attention: the adapted layer's attention module (`k_proj`, `v_proj`, `head_dim`, and the family's k-norm).
        key_source, value_source: `(batch * encoder_len, d_llm)`, in the LLM's dtype.
        encoder_shape: `(batch, encoder_len)`.
        value_scale: `(batch, encoder_len, 1, 1)`, the layer's gate times the encoder mask; `None` when the value
            source carries them already (a `v_proj` without bias commutes with the scale).

    Returns:
        `(keys, values)`, each `(batch, num_kv_heads, encoder_len, head_dim)`. The values come out multiplied by the
        layer's gate and zeroed on encoder padding. The gate scales the fused branch's softmax output in the paper
        and the reference code (`adaption_gate * softmax(...) @ V`); scaling the values is the same product, done
        once per projection rather than at every decoding step. Zeroed padding changes nothing where the mask
        removes it already, and makes a source that is all padding contribute nothing at all.
    """
    shape = (*encoder_shape, -1, attention.head_dim)
    keys = attention.k_proj(key_source).view(shape)
    if family.k_norm is not None:
        keys = getattr(attention, family.k_norm)(keys)
    values = attention.v_proj(value_source).view(shape)
    if value_scale is not None:
        values = values * value_scale
    return keys.transpose(1, 2), values.transpose(1, 2)


def encoder_attention_bias(encoder_mask: torch.Tensor) -> torch.Tensor:
    """`(batch, encoder_len)` 0/1 mask in the LLM's dtype -> `(batch, 1, 1, encoder_len)` additive bias: 0 on real
    tokens, the minimum of the dtype on padding (not -inf, so that a source that is all padding gives no NaN)."""
    lowest = torch.finfo(encoder_mask.dtype).min
    # min - min * mask, exact for a 0/1 mask: one operator where zeros, masked_fill and an unsqueeze take four.
    return torch.rsub(encoder_mask.view(encoder_mask.shape[0], 1, 1, -1), lowest, alpha=lowest)


def fused_attention_inputs(
    fused_states: torch.Tensor | None,
    encoder_attention_mask: torch.Tensor,
    fused_cache: Cache | None,
    gates: nn.Module,
    scale_value_sources: bool,
    slots: dict[int, int],
    family: LLMAttentionFamily,
    dtype: torch.dtype,
) -> FusedAttentionInputs:
    """What the adapted layers read in one pass: the sources to project (`fused_states` given) or the cache that
    holds their projections (`fused_states=None`).

    Args:
        fused_states: `(batch, encoder_len, 2M, d_llm)` from the fusion, or `None` when `fused_cache` holds them.
        encoder_attention_mask: `(batch, encoder_len)`, 1 on real source tokens.
        gates: the model's `LayAlignGates`; called inside this pass, so that sharded training gathers it there.
        scale_value_sources: True when no adapted `v_proj` has a bias: the gate and the encoder mask then scale the
            value sources (a linear map without bias commutes with the scale: one product for every layer instead
            of one per layer); otherwise they scale each layer's projected values.
        slots, family: as in [`FusedAttentionInputs`].
        dtype: the LLM's, which its frozen projections read (the LayAlign modules may train in float32 over
            half-precision bases).
    """
    sources = value_scales = None
    encoder_attention_mask = encoder_attention_mask.to(dtype)
    if fused_states is not None:
        padding = encoder_attention_mask.view(*encoder_attention_mask.shape, 1, 1)
        fused_states = fused_states.to(dtype)
        if scale_value_sources:
            # (1 for the key source of every layer, its gate for the value source: (2M, 1) -> (batch, T, 2M, 1))
            fused_states = fused_states * (gates(per_source=True).to(dtype) * padding)
        else:
            value_scales = (gates().to(dtype)[:, None, None, None, None] * padding).unbind(0)
        # (Rows flattened once for all layers: each projection is then a plain matrix product, with no reshaping of
        # its input and output on either pass.)
        sources = fused_states.flatten(0, 1).unbind(1)
    return FusedAttentionInputs(
        sources=sources,
        value_scales=value_scales,
        cache=fused_cache,
        encoder_bias=encoder_attention_bias(encoder_attention_mask),
        slots=slots,
        family=family,
    )


def fused_branch_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    encoder_bias: torch.Tensor,
    softcap: float | None,
) -> torch.Tensor:
    """Attention of the LLM's queries over the fused encoder keys and values, with its own softmax.

    Args:
        query: `(batch, num_heads, query_len, head_dim)`, normed and rotated by the LLM layer.
        key, value: `(batch, num_kv_heads, encoder_len, head_dim)`; no rotary embedding: encoder tokens have no
            position in the LLM's sequence.
        encoder_bias: `(batch, 1, 1, encoder_len)` from [`encoder_attention_bias`].

    Returns:
        `(batch, query_len, num_heads, head_dim)`, the layout attention functions return.
    """
    if encoder_bias.dtype != query.dtype:  # (checked first: even a no-op `.to` is a dispatch per layer and step)
        encoder_bias = encoder_bias.to(query.dtype)
    if softcap is None:
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=encoder_bias, scale=module.scaling, enable_gqa=key.shape[1] != query.shape[1]
        )
        return output.transpose(1, 2)
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * module.scaling
    scores = torch.tanh(scores / softcap) * softcap + encoder_bias
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probabilities, value).transpose(1, 2)


def _base_attention_function(module: nn.Module, base_implementation: str) -> Callable:
    if base_implementation == "eager":
        # "eager" is each modeling file's own function (Gemma 2's applies soft-capping), found next to the module.
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base_implementation]


def layalign_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    base_implementation: str,
    layalign_fused: FusedAttentionInputs | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-attention with the user's chosen implementation, plus the gated fused branch in adapted layers.

    The fused branch is added before `o_proj`, which equals applying `o_proj` to each branch and summing them: the
    gated branch goes through `o_proj`'s weight, and an `o_proj` bias is added once, not once per branch. Its gate
    is already in the fused values (see [`project_fused_kv`]).
    """
    output, weights = _base_attention_function(module, base_implementation)(
        module, query, key, value, attention_mask, **kwargs
    )
    if layalign_fused is None or (slot := layalign_fused.slots.get(module.layer_idx)) is None:
        return output, weights
    family = layalign_fused.family
    softcap = getattr(module, family.softcap, None) if family.softcap else None
    keys, values = layalign_fused.keys_and_values(module, slot)
    fused = fused_branch_attention(module, query, keys, values, layalign_fused.encoder_bias, softcap)
    return output + (fused if fused.dtype == output.dtype else fused.to(output.dtype)), weights


def fused_attention_implementation(base_implementation: str) -> str:
    """Registers (once per process) and returns the name of the LayAlign attention wrapping `base_implementation`.

    The attention mask is registered too, as the base implementation's: transformers builds no mask at all for an
    implementation it has no mask function for.
    """
    if base_implementation.startswith("layalign_"):
        return base_implementation
    name = f"layalign_{base_implementation}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        if base_implementation not in ALL_MASK_ATTENTION_FUNCTIONS:
            raise ValueError(
                f"LayAlign cannot wrap the attention implementation {base_implementation!r}; use one of "
                f"{sorted(ALL_MASK_ATTENTION_FUNCTIONS.valid_keys())}."
            )
        AttentionInterface.register(name, partial(layalign_attention_forward, base_implementation=base_implementation))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_implementation])
    return name

