"""The encoder and LLM families the vLLM plugin serves, keyed by `model_type`, as plain data.

The counterpart of `LLM_FAMILIES` (`modeling_layalign/attention_layalign.py`) and `ENCODER_FAMILIES`
(`modeling_layalign/encoders_layalign.py`) in our transformers implementation, restricted to what this plugin
implements: Llama, Mistral, Qwen2 and Qwen3 LLMs (each tested against `generate`), all run by vLLM's Llama classes
with our attention in their layers, and the encoders built by the same transformers classes as the tested mT5 and
XLM-R. Gemma 2/3 (embedding scale, soft-capping, four norms per layer), NLLB and decoder-only encoders are not
implemented yet. Adding an LLM that vLLM's Llama layers fit means an entry here, with an attention class of its own
in `modeling.py` where its attention differs (as Qwen3's per-head norms do); one they do not fit needs decoder
layers of its own. Classes are named as `"module:Class"` strings and imported
when a model is built, so that reading this table (at plugin registration, in every vLLM process) imports no model
code.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PretrainedConfig


@dataclass(frozen=True)
class LLMFamily:
    """How LayAlign plugs into vLLM's implementation of one LLM family.

    Attributes:
        causal_lm: the vLLM causal-LM class that runs the family; the checkpoint's `llm.*` weights load through it.
        attention: our attention class for its decoder layers, which adds the fused branch in the adapted layers.
        architecture: the `architectures` entry of `causal_lm`, as vLLM's registry names it.
        text_config_overrides: attributes set on (a copy of) the LLM's config before `causal_lm` reads it.
    """

    causal_lm: str
    attention: str
    architecture: str
    text_config_overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EncoderFamily:
    """How to build one family of encoders from its config with the transformers vLLM brings.

    Attributes:
        auto_class: the transformers auto class that builds the module our checkpoints hold under `encoder.*`.
        model_kwargs: keyword arguments for building it (BERT-style models drop the pooler, never read).
        position_offset: for learned absolute positions, the first row a token uses, so that a longer source is
            refused with a clear error; `None` where the encoder sets no limit.
    """

    auto_class: str
    model_kwargs: dict = field(default_factory=dict)
    position_offset: Callable[[PretrainedConfig], int] | None = None

    def max_length(self, config: PretrainedConfig) -> int | None:
        """The most tokens one source may hold, or `None` where the encoder sets no limit."""
        if self.position_offset is None:
            return None
        return config.max_position_embeddings - self.position_offset(config)


_LLAMA = LLMFamily(
    causal_lm="vllm.model_executor.models.llama:LlamaForCausalLM",
    attention="layalign_vllm.modeling:LayAlignLlamaAttention",
    architecture="LlamaForCausalLM",
)

LLM_FAMILIES: dict[str, LLMFamily] = {
    "llama": _LLAMA,
    # Mistral's transformers layout is Llama's; vLLM applies its `sliding_window` to every layer's self-attention
    # (from the text config), as transformers does.
    "mistral": _LLAMA,
    # Qwen2 is Llama with biases on q/k/v (none on o_proj); vLLM's Llama layers take that as `qkv_bias` (as vLLM
    # runs InternLM3). Its configs have no BOS token: the prefix is then [mapped encoder tokens, boundary].
    "qwen2": LLMFamily(
        _LLAMA.causal_lm, _LLAMA.attention, _LLAMA.architecture, text_config_overrides={"qkv_bias": True}
    ),
    # Qwen3 is Llama with an RMSNorm over each head of the queries and keys before RoPE (`q_norm`, `k_norm`), which
    # the fused keys go through too; its config names `attention_bias` and `head_dim`, which vLLM's Llama reads.
    "qwen3": LLMFamily(_LLAMA.causal_lm, "layalign_vllm.modeling:LayAlignQwen3Attention", _LLAMA.architecture),
}

_T5 = EncoderFamily("AutoModelForTextEncoding")
_BERT = EncoderFamily("AutoModel", {"add_pooling_layer": False}, position_offset=lambda config: 0)
_ROBERTA = EncoderFamily(
    "AutoModel", {"add_pooling_layer": False}, position_offset=lambda config: config.pad_token_id + 1
)

ENCODER_FAMILIES: dict[str, EncoderFamily] = {
    "t5": _T5,
    "mt5": _T5,
    "umt5": _T5,
    "bert": _BERT,
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
}
