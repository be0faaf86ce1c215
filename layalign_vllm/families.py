"""The encoder and LLM families the vLLM plugin serves, keyed by `model_type`, as plain data.

The counterpart of `LLM_FAMILIES` (`modeling_layalign/attention_layalign.py`) and `ENCODER_FAMILIES`
(`modeling_layalign/encoders_layalign.py`) in our transformers implementation, restricted to what this plugin
implements: every LLM family of ours (each tested against `generate`): Llama, Mistral, Qwen2 and Qwen3 run by vLLM's
Llama classes with our attention in their layers, Gemma 2 and Gemma 3 by our assembly of vLLM's Gemma parts
(`gemma.py`); and every encoder family, run by transformers as in our implementation (tested: mT5, XLM-R, NLLB and
a Llama as decoder-only encoder). Adding an LLM that vLLM's Llama layers fit means an entry here, with an attention
class of its own in `attention.py` where its attention differs (as Qwen3's per-head norms do); one they do not fit
needs decoder layers of its own. Classes are named as `"module:Class"` strings and imported by [`resolve`] when a
model is built, so that reading this table (at plugin registration, in every vLLM process) imports no model code.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class LLMFamily:
    """How LayAlign plugs into vLLM's implementation of one LLM family.

    Attributes:
        causal_lm: the causal-LM class that runs the family, built with `layer_type` (the decoder layer with our
            attention); the checkpoint's `llm.*` weights load through it.
        decoder_layer: our decoder-layer class, built with `attention` and `slots`, which passes the fused sources on.
        attention: our attention class for its decoder layers, which adds the fused branch in the adapted layers.
        architecture: the `architectures` entry of `causal_lm`, as vLLM's registry names it.
        text_config_overrides: attributes set on (a copy of) the LLM's config before `causal_lm` reads it.
    """

    causal_lm: str
    decoder_layer: str
    attention: str
    architecture: str
    text_config_overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EncoderFamily:
    """How to build and load one family of encoders with the transformers vLLM brings.

    Attributes:
        model_class: `"module:Class"` of the module our checkpoints hold under `encoder.*`: a transformers auto class
            that picks it from the config, or the class itself.
        pretrained_class: `"module:Class"` whose `from_pretrained` loads a base of the family, when the encoder is
            the `get_encoder()` of a whole encoder-decoder model (NLLB); `None`: `model_class` loads it.
        model_kwargs: keyword arguments for building and loading it (BERT-style models drop the pooler, never read).
        position_offset: for learned absolute positions, the first row a token uses, so that a longer source is
            refused with a clear error; `None` where the encoder sets no limit.
    """

    model_class: str
    pretrained_class: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    position_offset: Callable[[PretrainedConfig], int] | None = None

    def max_length(self, config: PretrainedConfig) -> int | None:
        """The most tokens one source may hold, or `None` where the encoder sets no limit."""
        if self.position_offset is None:
            return None
        return config.max_position_embeddings - self.position_offset(config)

    def build(self, config: PretrainedConfig) -> PreTrainedModel:
        """The encoder with random weights, in eval mode."""
        model_class = resolve(self.model_class)
        from_config = getattr(model_class, "from_config", None) or model_class._from_config  # auto class or model
        return from_config(config, **self.model_kwargs).eval()

    def from_pretrained(self, source: str, **kwargs) -> PreTrainedModel:
        """The encoder of the base `source`, under the names of the module `build` makes."""
        if self.pretrained_class is None:
            return resolve(self.model_class).from_pretrained(source, **self.model_kwargs, **kwargs)
        return resolve(self.pretrained_class).from_pretrained(source, **self.model_kwargs, **kwargs).get_encoder()


def resolve(qualified_name: str) -> type:
    """The class a `"module:Class"` string of these tables names, imported."""
    module, name = qualified_name.split(":")
    return getattr(importlib.import_module(module), name)


_LLAMA = LLMFamily(
    causal_lm="vllm.model_executor.models.llama:LlamaForCausalLM",
    decoder_layer="layalign_vllm.attention:LayAlignLlamaDecoderLayer",
    attention="layalign_vllm.attention:LayAlignLlamaAttention",
    architecture="LlamaForCausalLM",
)
_GEMMA = LLMFamily(
    causal_lm="layalign_vllm.gemma:LayAlignGemmaForCausalLM",
    decoder_layer="layalign_vllm.gemma:LayAlignGemmaDecoderLayer",
    attention="layalign_vllm.gemma:LayAlignGemma2Attention",
    architecture="Gemma2ForCausalLM",
)

LLM_FAMILIES: dict[str, LLMFamily] = {
    "llama": _LLAMA,
    # Mistral's transformers layout is Llama's; vLLM applies its `sliding_window` to every layer's self-attention
    # (from the text config), as transformers does.
    "mistral": _LLAMA,
    # Qwen2 is Llama with biases on q/k/v (none on o_proj); vLLM's Llama layers take that as `qkv_bias` (as vLLM
    # runs InternLM3). Its configs have no BOS token: the prefix is then [mapped encoder tokens, boundary].
    "qwen2": replace(_LLAMA, text_config_overrides={"qkv_bias": True}),
    # Qwen3 is Llama with an RMSNorm over each head of the queries and keys before RoPE (`q_norm`, `k_norm`), which
    # the fused keys go through too; its config names `attention_bias` and `head_dim`, which vLLM's Llama reads.
    "qwen3": replace(_LLAMA, attention="layalign_vllm.attention:LayAlignQwen3Attention"),
    # Gemma 2: scaled embeddings, four norms per layer, soft-capped attention logits and final logits, sliding-window
    # layers (`layer_types`).
    "gemma2": _GEMMA,
    # Gemma 3 adds per-head norms of the queries and keys (the fused keys normed too) and RoPE per layer type.
    "gemma3_text": replace(
        _GEMMA, attention="layalign_vllm.gemma:LayAlignGemma3Attention", architecture="Gemma3ForCausalLM"
    ),
}

_T5 = EncoderFamily("transformers:AutoModelForTextEncoding")
_BERT = EncoderFamily(
    "transformers:AutoModel", model_kwargs={"add_pooling_layer": False}, position_offset=lambda config: 0
)
_ROBERTA = EncoderFamily(
    "transformers:AutoModel",
    model_kwargs={"add_pooling_layer": False},
    position_offset=lambda config: config.pad_token_id + 1,
)
# NLLB: the encoder of an M2M100 model (sinusoidal positions that skip padding; one unpadded source per request).
_NLLB = EncoderFamily(
    "transformers.models.m2m_100.modeling_m2m_100:M2M100Encoder", pretrained_class="transformers:M2M100Model"
)
# A decoder-only LM as encoder: its base model, whose positions start at 0 (one unpadded source per request, so the
# position ids that skip left padding in `modeling_layalign/encoders_layalign.py` are the default ones here).
_DECODER_ONLY = EncoderFamily("transformers:AutoModel")

ENCODER_FAMILIES: dict[str, EncoderFamily] = {
    "t5": _T5,
    "mt5": _T5,
    "umt5": _T5,
    "bert": _BERT,
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "m2m_100": _NLLB,
    # the LLM families of `modeling_layalign/attention_layalign.py`, run by transformers here, so Gemma's too
    **{model_type: _DECODER_ONLY for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")},
}
