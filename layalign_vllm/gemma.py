"""Gemma 2 and Gemma 3 LLMs in vLLM, with LayAlign's fused branch in their adapted layers.

vLLM's `Gemma2Model` and `Gemma3Model` build their decoder layers with no hook for another layer class (its Llama
takes `layer_type`), and Gemma 2's layers pass nothing on to their attention; building theirs and replacing modules
would register every attention twice in vLLM's forward context. So the model and decoder layer here are our own,
assembled from vLLM's Gemma parts (attention, MLP, `GemmaRMSNorm`, its weight-name mapping), and both families share
them. They compute what vLLM's Gemma models compute, with three Gemma specifics kept:

- token embeddings are scaled by `sqrt(hidden_size)` (`embed_input_ids`); the mapped encoder tokens and the boundary
  written over the prefix placeholders are not, as in transformers, where the scale is inside the embedding module;
- four norms per layer (before and after the attention and the MLP);
- attention-logit soft-capping (`attn_logit_softcapping`, Gemma 2) on the self-attention and on the fused branch,
  as `modeling_layalign` applies it to both; the final logits are soft-capped by `final_logit_softcapping`.

vLLM's Gemma 3 passes no soft cap to its attention whatever the config says; ours follows the config, as transformers
does (Gemma 3's own configs set none). Sliding-window layers (`layer_types`) window the self-attention only.
"""

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import GemmaRMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.gemma2 import Gemma2Attention, Gemma2ForCausalLM
from vllm.model_executor.models.gemma3 import Gemma3Attention, Gemma3MLP
from vllm.model_executor.models.utils import AutoWeightsLoader, make_layers, maybe_prefix

from .attention import FusedBranchAttention, PerHeadNorms, norm_and_attend


class LayAlignGemma2Attention(FusedBranchAttention, Gemma2Attention):
    """vLLM's Gemma 2 attention; in adapted layers, plus the fused branch before `o_proj`, soft-capped alike."""


class LayAlignGemma3Attention(PerHeadNorms, FusedBranchAttention, Gemma3Attention):
    """vLLM's Gemma 3 attention (per-head `q_norm` / `k_norm` before RoPE, RoPE per layer type), plus the fused
    branch."""


class LayAlignGemmaDecoderLayer(nn.Module):
    """A Gemma 2 / 3 decoder layer with our `attention`: norm, attention, norm, residual; norm, MLP, norm, residual.

    The MLP is vLLM's `Gemma3MLP`, whose activation comes from the config (Gemma 2's `gelu_pytorch_tanh` too)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        prefix: str = "",
        *,
        attention: type[FusedBranchAttention],
        slots: Mapping[int, int],
    ):
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.self_attn = attention(
            config=config,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            max_position_embeddings=config.max_position_embeddings,
            cache_config=vllm_config.cache_config,
            quant_config=quant_config,
            attn_logits_soft_cap=config.attn_logit_softcapping,
            prefix=f"{prefix}.self_attn",
            slots=slots,
        )
        self.mlp = Gemma3MLP(
            config.hidden_size, config.intermediate_size, config.hidden_activation, quant_config, f"{prefix}.mlp"
        )
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        fused_sources: tuple[torch.Tensor, ...] | None = None,
        fused_gates: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = norm_and_attend(self, positions, hidden_states, residual, fused_sources, fused_gates)
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        hidden_states = self.post_feedforward_layernorm(self.mlp(hidden_states))
        return hidden_states, residual


@support_torch_compile
class LayAlignGemmaModel(nn.Module):
    """Scaled token embeddings, the decoder layers (`layer_type(vllm_config=..., prefix=...)`) and the final norm.

    Compiled by vLLM unless `enforce_eager` (as its Gemma models and Llama model are, ours with the fused sources)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module]):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size,
            config.hidden_size,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.embed_tokens",
        )
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: layer_type(vllm_config=vllm_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # In the model's dtype (built under vLLM's default dtype), as vLLM's and transformers' Gemma round it.
        self.register_buffer("normalizer", torch.tensor(config.hidden_size**0.5), persistent=False)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.normalizer

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **layer_kwargs,
    ) -> torch.Tensor:
        """`(num_tokens, d_llm)` final hidden states; `layer_kwargs` (the fused sources and gates) go to every
        layer. No pipeline parallelism: `intermediate_tensors` is accepted for vLLM's call and unused."""
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, **layer_kwargs)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LayAlignGemmaForCausalLM(nn.Module):
    """[`LayAlignGemmaModel`] with soft-capped logits from the tied embeddings (or an LM head if the config unties
    them), loading transformers' Gemma weight names through vLLM's Gemma mapping (q/k/v and gate/up merged)."""

    hf_to_vllm_mapper = Gemma2ForCausalLM.hf_to_vllm_mapper
    packed_modules_mapping = Gemma2ForCausalLM.packed_modules_mapping

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module]):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = LayAlignGemmaModel(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"), layer_type=layer_type
        )
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
        self.logits_processor = LogitsProcessor(config.vocab_size, soft_cap=config.final_logit_softcapping)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return self.logits_processor(head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tied_head = ["lm_head."] if self.lm_head is None else None  # saved anyway, it is the embedding
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=tied_head)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
