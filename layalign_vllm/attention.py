"""The fused branch of LayAlign's adapted LLM layers (paper Sec. 3.2) inside vLLM's attention, and the Llama layers.

In every adapted layer the layer's own normed and rotated queries attend over the fused keys and values (no rotary
embedding on them) through a separate softmax, and the result is added to the self-attention output before `o_proj`
(`modeling_layalign/attention_layalign.py`, `layalign_attention_forward`). The fused keys and values are projected
once per request, by the layer's own frozen key and value maps, and kept in vLLM's cross-attention KV cache.

[`FusedBranchAttention`] adds the branch to a vLLM attention class whose forward is `qkv_proj` -> split -> the
family's query/key norms ([`PerHeadNorms`] where there are some) -> RoPE -> attention -> `o_proj`: Llama's here (and
Qwen3's norms on it), Gemma's in `gemma.py`. Which class a family uses is in `families.LLM_FAMILIES`.
"""

import copy
from collections.abc import Mapping
from functools import partial

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import CrossAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType


def project_fused_kv(
    attention: nn.Module, key_source: torch.Tensor, value_source: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapted layer's fused keys and values, projected by its own frozen key and value maps.

    vLLM merges `q_proj`, `k_proj` and `v_proj` into `qkv_proj`; its output is sliced rather than its weight, since
    on CPU vLLM replaces that weight by a packed one after loading.

    Args:
        attention: the layer's vLLM attention (`qkv_proj`, `q_size`, `kv_size`).
        key_source, value_source: `(encoder_tokens, d_llm)`, the sources of this layer's keys and values of every
            request that starts in this step, in the LLM's dtype.
        gate: `()`, this layer's gate.

    Returns:
        `(keys, values)`, each `(encoder_tokens, num_kv_heads * head_dim)`, the values multiplied by the gate (after
        the bias, as `attention_layalign.project_fused_kv` does for a `v_proj` with bias): the paper's
        `gate * softmax(q K^T) V` with the product moved onto `V`, once per request.
    """
    num_tokens = key_source.shape[0]
    projected, _ = attention.qkv_proj(torch.cat([key_source, value_source]))
    keys = projected[:num_tokens, attention.q_size : attention.q_size + attention.kv_size]
    values = projected[num_tokens:, attention.q_size + attention.kv_size :] * gate.to(projected.dtype)
    return keys, values


class FusedAttention(nn.Module):
    """The fused branch of one adapted layer: a vLLM cross-attention over the layer's fused keys and values.

    vLLM keeps the keys and values of `CrossAttention` in the request's cross-attention KV cache, written on the
    request's first step (when they are passed) and read on every later step (when `None` is passed). The branch
    reads every source token: a model-wide sliding window (Mistral's), which vLLM's attention takes from
    `cache_config`, is the self-attention's only. It soft-caps its scores as the self-attention does (Gemma 2).
    """

    def __init__(
        self, attention: nn.Module, slot: int, cache_config, prefix: str, logits_soft_cap: float | None = None
    ):
        super().__init__()
        self.slot = slot
        if cache_config is not None and cache_config.sliding_window is not None:
            cache_config = copy.copy(cache_config)
            cache_config.sliding_window = None
        self.attn = CrossAttention(
            attention.num_heads,
            attention.head_dim,
            attention.scaling,
            num_kv_heads=attention.num_kv_heads,
            cache_config=cache_config,
            logits_soft_cap=logits_soft_cap,
            prefix=f"{prefix}.attn",
            attn_type=AttentionType.ENCODER_DECODER,
        )

    def forward(
        self,
        attention: "FusedBranchAttention",
        query: torch.Tensor,
        fused_sources: tuple[torch.Tensor, ...] | None,
        fused_gates: torch.Tensor | None,
    ) -> torch.Tensor:
        """`(num_tokens, num_heads * head_dim)` for the normed and rotated `query` of the same shape.

        `fused_sources` (the `2M` sources, each `(encoder_tokens, d_llm)`) and `fused_gates` (`(M,)`) are given on a
        step where some request starts, `None` otherwise."""
        keys = values = None
        if fused_sources is not None:
            keys, values = project_fused_kv(
                attention, fused_sources[2 * self.slot], fused_sources[2 * self.slot + 1], fused_gates[self.slot]
            )
            keys = attention.norm_keys(keys)
        return self.attn(query, keys, values)


class FusedBranchAttention(nn.Module):
    """Mixin for a vLLM attention class (`qkv_proj`, `rotary_emb`, `attn`, `o_proj`), listed before it: built with
    the class's own keyword arguments plus `slots` (LLM layer index -> adapted slot), it gives the layer at `prefix`
    its fused branch if `slots` names it (soft-capped as the class's `attn_logits_soft_cap`, where it has one), and
    its forward adds the branch before `o_proj`. Families that norm queries and keys override the two norm hooks."""

    def __init__(self, *args, slots: Mapping[int, int], **kwargs):
        super().__init__(*args, **kwargs)
        prefix = kwargs["prefix"]
        slot = slots.get(extract_layer_index(prefix))
        self.fused = None
        if slot is not None:
            soft_cap = kwargs.get("attn_logits_soft_cap")
            self.fused = FusedAttention(self, slot, kwargs.get("cache_config"), f"{prefix}.fused", soft_cap)

    def norm_queries_and_keys(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the family does to the projected queries and keys before RoPE: nothing by default."""
        return q, k

    def norm_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """What the family does to projected keys before RoPE, applied to the fused keys (which get no RoPE)."""
        return keys

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        fused_sources: tuple[torch.Tensor, ...] | None = None,
        fused_gates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, *self.norm_queries_and_keys(q, k))
        attn_output = self.attn(q, k, v)
        if self.fused is not None:
            attn_output = attn_output + self.fused(self, q, fused_sources, fused_gates)
        output, _ = self.o_proj(attn_output)
        return output


class PerHeadNorms:
    """Mixin for a [`FusedBranchAttention`] with a norm over each head of the queries (`q_norm`) and of the keys
    (`k_norm`) before RoPE (Qwen3, Gemma 3); the fused keys go through `k_norm` too
    (`attention_layalign.LLM_FAMILIES`)."""

    def norm_queries_and_keys(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _per_head(self.q_norm, q, self.head_dim), self.norm_keys(k)

    def norm_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return _per_head(self.k_norm, keys, self.head_dim)


def _per_head(norm: nn.Module, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`norm` over each head of `x`, `(num_tokens, num_heads * head_dim)`."""
    return norm(x.view(*x.shape[:-1], -1, head_dim)).view(x.shape)


class LayAlignLlamaAttention(FusedBranchAttention, LlamaAttention):
    """vLLM's Llama attention; in adapted layers, plus the fused branch before `o_proj`."""


class LayAlignQwen3Attention(PerHeadNorms, LayAlignLlamaAttention):
    """Qwen3's attention on vLLM's Llama one: its per-head RMSNorms `q_norm` and `k_norm` (loaded by these names,
    as vLLM's `Qwen3Attention` has them) added here."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        epsilon = kwargs["config"].rms_norm_eps
        self.q_norm = RMSNorm(self.head_dim, eps=epsilon)
        self.k_norm = RMSNorm(self.head_dim, eps=epsilon)


class LayAlignLlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer with our `attention` (a [`LayAlignLlamaAttention`]); passes the fused sources
    to it."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        prefix: str = "",
        config=None,
        *,
        attention: type[LayAlignLlamaAttention],
        slots: Mapping[int, int],
    ):
        super().__init__(vllm_config, prefix, config, attn_layer_type=partial(attention, slots=slots))

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        fused_sources: tuple[torch.Tensor, ...] | None = None,
        fused_gates: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = norm_and_attend(self, positions, hidden_states, residual, fused_sources, fused_gates)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


def norm_and_attend(
    layer: nn.Module,
    positions: torch.Tensor,
    hidden_states: torch.Tensor,
    residual: torch.Tensor | None,
    fused_sources: tuple[torch.Tensor, ...] | None,
    fused_gates: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first half of a vLLM pre-norm decoder layer (Llama's, Gemma's): `input_layernorm`, which adds the previous
    layer's output to the residual stream (vLLM carries the two apart), then `self_attn` with the fused branch.

    Returns:
        `(attention output, residual stream)`, each `(num_tokens, d_llm)`.
    """
    if residual is None:
        residual = hidden_states
        hidden_states = layer.input_layernorm(hidden_states)
    else:
        hidden_states, residual = layer.input_layernorm(hidden_states, residual)
    return layer.self_attn(positions, hidden_states, fused_sources, fused_gates), residual
