"""LayAlign (Ruan et al., NAACL 2025): every layer of a frozen multilingual encoder fused into a frozen LLM.

The LLM reads `[BOS, mapped encoder tokens, boundary, text]` (input alignment), and in every adapted layer its own
queries also attend, through a separate softmax scaled by a zero-initialised gate, over keys and values that its
own frozen `k_proj` / `v_proj` project from a learned per-layer mix of all encoder layers (layer-wise fusion).

The fused branch joins the LLM through transformers' `AttentionInterface`: no LLM class is forked or patched. All
per-batch state (the fused keys and values, the encoder padding mask, the gates) travels as a keyword argument of
the forward pass, so beam search, `num_return_sequences`, several models and several threads never interfere.
"""

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForTextEncoding,
    GenerationConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface, load_state_dict
from transformers.models.m2m_100.modeling_m2m_100 import M2M100Encoder, M2M100Model
from transformers.utils import SAFE_WEIGHTS_NAME, ModelOutput, cached_file, logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_layalign import CHECKPOINT_FORMATS, LayAlignConfig


logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Per-family tables
# ---------------------------------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class EncoderFamily:
    """How to build, load and run one family of encoders.

    Attributes:
        model_class: the encoder's class inside LayAlign, or the auto class that picks it from the config.
        pretrained_class: class whose `from_pretrained` loads a checkpoint of the family.
        takes_encoder: the loaded model is an encoder-decoder; keep its `get_encoder()`.
        causal: a decoder-only LM used as encoder; it needs position ids that skip left padding.
        model_kwargs: keyword arguments for building and loading the encoder (BERT-style models drop the pooler,
            which LayAlign never reads).
    """

    model_class: type
    pretrained_class: type
    takes_encoder: bool = False
    causal: bool = False
    model_kwargs: dict = field(default_factory=dict)

    def encoder_class(self, config) -> type:
        """The class of the encoder module for `config`, the same whether built from a config or loaded."""
        mapping = getattr(self.model_class, "_model_mapping", None)
        return mapping[type(config)] if mapping is not None else self.model_class

    def build(self, config) -> PreTrainedModel:
        """The encoder with random weights (or on the meta device, inside `from_pretrained`)."""
        return self.encoder_class(config)._from_config(config, **self.model_kwargs)

    def encoder_part(self, model: PreTrainedModel) -> PreTrainedModel:
        """The module LayAlign runs as encoder: `model` itself, its encoder, or a causal LM's base model."""
        expected = self.encoder_class(model.config)
        if type(model) is not expected:
            if self.takes_encoder:
                model = model.get_encoder()
            elif self.causal:
                model = model.get_decoder()
        if type(model) is not expected:
            raise ValueError(
                f"The encoder must be a {expected.__name__} (or a model holding one), got {type(model).__name__}."
            )
        return model


_BIDIRECTIONAL = EncoderFamily(AutoModelForTextEncoding, AutoModelForTextEncoding)
_BERT_STYLE = EncoderFamily(AutoModelForTextEncoding, AutoModelForTextEncoding, model_kwargs={"add_pooling_layer": False})
_NLLB = EncoderFamily(M2M100Encoder, M2M100Model, takes_encoder=True)
_DECODER_ONLY = EncoderFamily(AutoModel, AutoModel, causal=True)

ENCODER_FAMILIES: dict[str, EncoderFamily] = {
    "t5": _BIDIRECTIONAL,
    "mt5": _BIDIRECTIONAL,
    "umt5": _BIDIRECTIONAL,
    "bert": _BERT_STYLE,
    "roberta": _BERT_STYLE,
    "xlm-roberta": _BERT_STYLE,
    "m2m_100": _NLLB,
    **{model_type: _DECODER_ONLY for model_type in LLM_FAMILIES},
}


def llm_family(config) -> LLMAttentionFamily:
    """Returns the attention family of an LLM config, or raises a `ValueError` naming the supported ones."""
    if config.model_type not in LLM_FAMILIES:
        raise ValueError(
            f"LayAlign does not support the LLM family {config.model_type!r}; supported: {sorted(LLM_FAMILIES)}."
        )
    return LLM_FAMILIES[config.model_type]


def encoder_family(config) -> EncoderFamily:
    """Returns the family of an encoder config, or raises a `ValueError` naming the supported ones."""
    if config.model_type not in ENCODER_FAMILIES:
        raise ValueError(
            f"LayAlign does not support the encoder family {config.model_type!r}; "
            f"supported: {sorted(ENCODER_FAMILIES)}."
        )
    return ENCODER_FAMILIES[config.model_type]


# ---------------------------------------------------------------------------------------------------------------------
# Fusion-enhanced attention, registered with transformers' AttentionInterface
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class FusedAttentionInputs:
    """What the adapted LLM layers read from the encoder during one forward pass.

    It reaches the attention function as the keyword argument `layalign_fused` and is never stored on a module.

    Attributes:
        key_value: `(batch, num_adapted_layers, 2, num_kv_heads, encoder_len, head_dim)`: for each adapted layer
            its fused keys (index 0) and values (index 1), already projected by the layer's frozen `k_proj` /
            `v_proj` (and k-norm). Batch-first so that `generate` expands it for beams and samples.
        encoder_mask: `(batch, encoder_len)` bool, `True` on real encoder tokens.
        gates: `(num_adapted_layers,)`, the learned scale of each layer's fused branch.
        slots: LLM layer index -> position of that layer in `key_value` and `gates`.
        family: the LLM family's attention details.
    """

    key_value: torch.Tensor
    encoder_mask: torch.Tensor
    gates: torch.Tensor
    slots: dict[int, int]
    family: LLMAttentionFamily


def fused_branch_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    encoder_mask: torch.Tensor,
    softcap: float | None,
) -> torch.Tensor:
    """Attention of the LLM's queries over the fused encoder keys and values, with its own softmax.

    Args:
        query: `(batch, num_heads, query_len, head_dim)`, normed and rotated by the LLM layer.
        key, value: `(batch, num_kv_heads, encoder_len, head_dim)`; no rotary embedding: encoder tokens have no
            position in the LLM's sequence.
        encoder_mask: `(batch, encoder_len)` bool, `True` on real encoder tokens.

    Returns:
        `(batch, query_len, num_heads, head_dim)`, the layout attention functions return.
    """
    mask = encoder_mask[:, None, None, :]
    if softcap is None:
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=module.scaling, enable_gqa=key.shape[1] != query.shape[1]
        )
        return output.transpose(1, 2)
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * module.scaling
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
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
    gated branch goes through `o_proj`'s weight, and an `o_proj` bias is added once, not once per branch.
    """
    output, weights = _base_attention_function(module, base_implementation)(
        module, query, key, value, attention_mask, **kwargs
    )
    if layalign_fused is None or (slot := layalign_fused.slots.get(module.layer_idx)) is None:
        return output, weights
    family = layalign_fused.family
    softcap = getattr(module, family.softcap, None) if family.softcap else None
    fused_key, fused_value = layalign_fused.key_value[:, slot].unbind(1)
    fused = fused_branch_attention(module, query, fused_key, fused_value, layalign_fused.encoder_mask, softcap)
    return output + layalign_fused.gates[slot].to(output.dtype) * fused, weights


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


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------------


class LayAlignInputMapping(nn.Module):
    """Maps the encoder's final states into the LLM's embedding space (MindMerger's input alignment)."""

    def __init__(self, encoder_hidden_size: int, llm_hidden_size: int):
        super().__init__()
        self.up = nn.Linear(encoder_hidden_size, 2 * encoder_hidden_size)
        self.down = nn.Linear(2 * encoder_hidden_size, llm_hidden_size)

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        """`(batch, encoder_len, d_enc)` -> `(batch, encoder_len, d_llm)`."""
        return self.down(F.relu(self.up(encoder_states)))


class LayAlignBoundary(nn.Module):
    """The learned vector that separates the mapped encoder tokens from the text; starts at zero."""

    def __init__(self, llm_hidden_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(llm_hidden_size))

    def forward(self, batch_size: int) -> torch.Tensor:
        """Returns `(batch, 1, d_llm)`."""
        return self.embedding.expand(batch_size, 1, -1)


class LayAlignLayerFusion(nn.Module):
    """Mixes the encoder's layers into one key source and one value source per adapted LLM layer.

    A linear map over the layer axis, `Linear(N_enc, 2M)`, gives each of the `2M` sources its own learned mix of all
    encoder layers; after a ReLU a shared `Linear(d_enc, d_llm)` brings them to the LLM's width ("mlp" adds a ReLU
    and `Linear(d_llm, d_llm)`). Source `2m` feeds the keys of adapted layer `m`, source `2m + 1` its values.
    """

    def __init__(
        self, num_encoder_layers: int, num_adapted_layers: int, encoder_hidden_size: int, llm_hidden_size: int, structure: str
    ):
        super().__init__()
        self.layer_mix = nn.Linear(num_encoder_layers, 2 * num_adapted_layers)
        self.projection = nn.Linear(encoder_hidden_size, llm_hidden_size)
        self.refine = nn.Linear(llm_hidden_size, llm_hidden_size) if structure == "mlp" else None

    def forward(self, encoder_layers: torch.Tensor) -> torch.Tensor:
        """`(batch, encoder_len, d_enc, N_enc)` -> `(batch, encoder_len, 2M, d_llm)`.

        The layer axis comes last so that `layer_mix` applies to it without a copy of the stacked states.
        """
        mixed = F.relu(self.layer_mix(encoder_layers)).transpose(2, 3)
        fused = self.projection(mixed)
        if self.refine is not None:
            fused = self.refine(F.relu(fused))
        return fused


class LayAlignGate(nn.Module):
    """The learned scale of one adapted layer's fused branch; exactly zero at initialisation."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(1))


class LayAlignGates(nn.Module):
    """One [`LayAlignGate`] per adapted LLM layer, in `layers`, keyed by the layer's index."""

    def __init__(self, adapted_layers: list[int]):
        super().__init__()
        self.layers = nn.ModuleDict({str(layer): LayAlignGate() for layer in adapted_layers})

    def forward(self) -> torch.Tensor:
        """`(num_adapted_layers,)`, in the order of `adapted_llm_layers`.

        Read through a call rather than by key, so that the gates work the same when peft wraps this module.
        """
        return torch.cat([gate.gate for gate in self.layers.values()])


@dataclass
class LayAlignEncoderOutput(ModelOutput):
    """What [`LayAlignForCausalLM.encode`] computes once per batch of source texts.

    Attributes:
        mapped_embeds: `(batch, encoder_len, d_llm)`, the final encoder states in the LLM's embedding space, or
            `None` without input mapping.
        fused_kv: `(batch, num_adapted_layers, 2, num_kv_heads, encoder_len, head_dim)`, the fused keys and values
            of every adapted layer, or `None` without layer fusion.
        attention_mask: `(batch, encoder_len)`, 1 on real encoder tokens.
    """

    mapped_embeds: torch.Tensor | None = None
    fused_kv: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained base class
# ---------------------------------------------------------------------------------------------------------------------


class LayAlignPreTrainedModel(PreTrainedModel):
    config: LayAlignConfig
    config_class = LayAlignConfig
    base_model_prefix = "layalign"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module):
        if isinstance(module, LayAlignBoundary):
            init.zeros_(module.embedding)
        elif isinstance(module, LayAlignGate):
            init.zeros_(module.gate)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------------------------------
# Task model
# ---------------------------------------------------------------------------------------------------------------------

# Keyword arguments of `from_pretrained` that locate the LayAlign files themselves.
_LAYALIGN_FILE_KWARGS = ("revision", "subfolder", "code_revision", "trust_remote_code", "_from_auto", "adapter_kwargs")
# Keyword arguments of `from_pretrained` that also apply to loading the base models.
_SHARED_LOAD_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token")


class LayAlignForCausalLM(LayAlignPreTrainedModel, GenerationMixin):
    """An English-centric LLM that reads a multilingual encoder's view of the source text.

    Children: `encoder` and `llm` (the two pretrained models, frozen by default) and the LayAlign modules listed in
    `layalign_module_names`: `input_mapping`, `boundary`, `fusion` and one `LayAlignGate` per adapted LLM layer in
    `gates` (keyed by the layer's index). Build one for training with [`from_base_models`].
    """

    layalign_module_names = ("input_mapping", "boundary", "fusion", "gates")

    def __init__(self, config: LayAlignConfig, encoder: PreTrainedModel | None = None, llm: PreTrainedModel | None = None):
        super().__init__(config)
        self.llm_family = llm_family(config.text_config)
        self.encoder_family = encoder_family(config.encoder_config)
        self.encoder = encoder if encoder is not None else self.encoder_family.build(config.encoder_config)
        self.llm = llm if llm is not None else AutoModelForCausalLM.from_config(config.text_config)
        for base in (self.encoder, self.llm):
            # A config built around a loaded model's config resets its attention choice; take the base's default.
            if base.config._attn_implementation is None:
                base.config._attn_implementation = base.get_correct_attn_implementation(None)
        config.encoder_config = self.encoder.config
        config.text_config = self.llm.config

        encoder_width, llm_width = config.encoder_config.hidden_size, config.text_config.hidden_size
        self.input_mapping = LayAlignInputMapping(encoder_width, llm_width) if config.use_input_mapping else None
        self.boundary = LayAlignBoundary(llm_width) if config.use_input_mapping else None
        self.fusion = None
        self.gates = None
        if config.use_layer_fusion:
            self.fusion = LayAlignLayerFusion(
                len(config.fused_encoder_layers),
                len(config.adapted_llm_layers),
                encoder_width,
                llm_width,
                config.fusion_structure,
            )
            self.gates = LayAlignGates(config.adapted_llm_layers)
        self._use_fused_attention()
        self.post_init()
        self.apply_trainable_parts()
        # Every label of `input_ids` is predicted, the first one from the boundary. Without a (shifting) loss type,
        # `Trainer` counts all of them when it normalises the loss, instead of dropping each row's first label.
        self.loss_type = None

    # -- construction -------------------------------------------------------------------------------------------------

    @classmethod
    def from_base_models(
        cls,
        encoder: str | os.PathLike | PreTrainedModel,
        llm: str | os.PathLike | PreTrainedModel,
        *,
        config: LayAlignConfig | None = None,
        encoder_kwargs: dict | None = None,
        llm_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "LayAlignForCausalLM":
        """Builds a fresh LayAlign model from a pretrained encoder and a pretrained LLM.

        Args:
            encoder: Hub id or folder of the encoder (an encoder-decoder such as mT5 or NLLB gives its encoder), or
                an already loaded model.
            llm: Hub id or folder of the causal LM, or an already loaded one.
            config: a full `LayAlignConfig` to use instead of deriving one (used when loading a checkpoint).
            encoder_kwargs, llm_kwargs: keyword arguments of `from_pretrained` for each base (`dtype`,
                `attn_implementation`, `device_map`, `gguf_file`, `quantization_config`, ...).
            config_kwargs: `LayAlignConfig` fields, e.g. `fused_encoder_layers=[0, 4, 8]`, `fusion_structure="mlp"`.

        The LayAlign modules take the LLM's dtype and device. The config records where the bases came from, so that
        `save_pretrained` writes a small LayAlign-only checkpoint whenever the bases stay frozen.
        """
        encoder = cls._load_encoder(encoder, **(encoder_kwargs or {}))
        llm = llm if isinstance(llm, PreTrainedModel) else AutoModelForCausalLM.from_pretrained(llm, **(llm_kwargs or {}))
        if config is None:
            # An empty mapping keeps each base's own attention implementation (a plain value would replace both).
            config_kwargs.setdefault("attn_implementation", {})
            config = LayAlignConfig(
                encoder_config=encoder.config,
                text_config=llm.config,
                encoder_name_or_path=_base_model_source(encoder),
                llm_name_or_path=_base_model_source(llm),
                **config_kwargs,
            )
        else:
            _check_base_matches(config.encoder_config, encoder.config, "encoder_name_or_path")
            _check_base_matches(config.text_config, llm.config, "llm_name_or_path")
        model = cls(config, encoder=encoder, llm=llm)
        reference = llm.get_input_embeddings().weight
        for name in cls.layalign_module_names:
            if (module := getattr(model, name)) is not None:
                module.to(device=reference.device, dtype=reference.dtype)
        model.generation_config = GenerationConfig.from_dict(llm.generation_config.to_dict())
        return model

    @staticmethod
    def _load_encoder(encoder: str | os.PathLike | PreTrainedModel, **kwargs) -> PreTrainedModel:
        if not isinstance(encoder, PreTrainedModel):
            family = encoder_family(AutoConfig.from_pretrained(encoder, **_hub_kwargs(kwargs)))
            encoder = family.pretrained_class.from_pretrained(encoder, **family.model_kwargs, **kwargs)
        return encoder_family(encoder.config).encoder_part(encoder)

    def apply_trainable_parts(self) -> None:
        """Sets `requires_grad` from the config: the LayAlign modules train, the bases as `train_encoder` / `train_llm` say."""
        self.encoder.requires_grad_(self.config.train_encoder)
        self.llm.requires_grad_(self.config.train_llm)
        for name in self.layalign_module_names:
            if (module := getattr(self, name)) is not None:
                module.requires_grad_(True)

    def train(self, mode: bool = True) -> "LayAlignForCausalLM":
        super().train(mode)
        if mode and not self.config.encoder_dropout_in_training:
            self.encoder.eval()
        return self

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """`PreTrainedModel.activation_checkpointing_enable` (also reached through `gradient_checkpointing_enable`).

        The fused keys and values reach the LLM layers as a keyword argument shared by all of them; reentrant
        checkpointing cannot differentiate through such inputs, so only the non-reentrant kind (the default) runs.
        """
        if (activation_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "LayAlign supports only non-reentrant activation checkpointing: pass `use_reentrant=False` (the "
                "default) in `gradient_checkpointing_kwargs`."
            )
        super().activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def _use_fused_attention(self) -> None:
        """Points the LLM at the LayAlign wrapper of whatever attention implementation it currently uses.

        Called at every forward, so a later `set_attn_implementation` by the user keeps the fused branch.
        """
        current = self.llm.config._attn_implementation or "eager"
        if not current.startswith("layalign_"):
            self.llm.config._attn_implementation = fused_attention_implementation(current)

    def _adapted_attention_modules(self) -> list[nn.Module]:
        layers = self.llm.get_decoder().layers
        return [layers[index].self_attn for index in self.config.adapted_llm_layers]

    # -- encoder side ---------------------------------------------------------------------------------------------------

    def encode(
        self, encoder_input_ids: torch.LongTensor, encoder_attention_mask: torch.Tensor | None = None
    ) -> LayAlignEncoderOutput:
        """Runs the encoder once and computes everything the LLM side needs from it.

        Args:
            encoder_input_ids: `(batch, encoder_len)` source-text token ids from the encoder's tokenizer.
            encoder_attention_mask: `(batch, encoder_len)`, 1 on real tokens, 0 on padding (either side).

        Pass the result's fields to `forward` (`mapped_encoder_embeds`, `fused_kv`, `encoder_attention_mask`) to
        reuse one encoding across several calls; `generate` does this by itself.
        """
        _check_token_ids("encoder_input_ids", encoder_input_ids)
        if encoder_attention_mask is None:
            encoder_attention_mask = torch.ones_like(encoder_input_ids)
        elif encoder_attention_mask.shape != encoder_input_ids.shape:
            raise ValueError(
                f"`encoder_attention_mask` has shape {tuple(encoder_attention_mask.shape)}, but `encoder_input_ids` "
                f"has shape {tuple(encoder_input_ids.shape)}; they must match."
            )
        encoder_kwargs = {}
        if self.encoder_family.causal:
            encoder_kwargs["position_ids"] = _positions_from_mask(encoder_attention_mask)
        encoder_trains = any(parameter.requires_grad for parameter in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):
            encoded = self.encoder(
                input_ids=encoder_input_ids,
                attention_mask=encoder_attention_mask,
                output_hidden_states=True,
                return_dict=True,
                **encoder_kwargs,
            )
        mapped_embeds = fused_kv = None
        if self.input_mapping is not None:
            dtype = next(self.input_mapping.parameters()).dtype
            mapped_embeds = self.input_mapping(encoded.last_hidden_state.to(dtype))
        if self.fusion is not None:
            dtype = next(self.fusion.parameters()).dtype
            layers = torch.stack([encoded.hidden_states[i].to(dtype) for i in self.config.fused_encoder_layers], dim=-1)
            fused_kv = self._project_fused_states(self.fusion(layers))
        return LayAlignEncoderOutput(mapped_embeds=mapped_embeds, fused_kv=fused_kv, attention_mask=encoder_attention_mask)

    def _project_fused_states(self, fused: torch.Tensor) -> torch.Tensor:
        """Projects the fusion's `(batch, encoder_len, 2M, d_llm)` sources with each adapted layer's frozen k/v maps.

        Returns `(batch, M, 2, num_kv_heads, encoder_len, head_dim)`.
        """
        batch_size, encoder_len = fused.shape[:2]
        # The LayAlign modules may train in float32 over half-precision bases: the frozen projections read the LLM's
        # dtype (what autocast does anyway, and what a call outside autocast needs).
        fused = fused.to(self.llm.get_input_embeddings().weight.dtype)
        per_layer = []
        for slot, attention in enumerate(self._adapted_attention_modules()):
            keys = attention.k_proj(fused[:, :, 2 * slot]).view(batch_size, encoder_len, -1, attention.head_dim)
            values = attention.v_proj(fused[:, :, 2 * slot + 1]).view(batch_size, encoder_len, -1, attention.head_dim)
            if self.llm_family.k_norm is not None:
                keys = getattr(attention, self.llm_family.k_norm)(keys)
            per_layer.append(torch.stack([keys.transpose(1, 2), values.transpose(1, 2)], dim=1))
        return torch.stack(per_layer, dim=1)

    # -- LLM side -------------------------------------------------------------------------------------------------------

    def num_prefix_positions(self, encoder_len: int) -> int:
        """Length of `[BOS, mapped encoder tokens, boundary]`, the part of the LLM sequence in front of `input_ids`."""
        has_bos = self.config.text_config.bos_token_id is not None
        return int(has_bos) + (encoder_len + 1 if self.config.use_input_mapping else 0)

    def _prefix_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        batch_size = encoder_attention_mask.shape[0]
        ones = encoder_attention_mask.new_ones(batch_size, 1)
        parts = [ones] if self.config.text_config.bos_token_id is not None else []
        if self.config.use_input_mapping:
            parts += [encoder_attention_mask, ones]
        return torch.cat(parts, dim=1) if parts else encoder_attention_mask[:, :0]

    def _prefix_embeds(self, mapped_embeds: torch.Tensor | None, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        parts = []
        bos_token_id = self.config.text_config.bos_token_id
        if bos_token_id is not None:
            bos = torch.full((batch_size, 1), bos_token_id, dtype=torch.long, device=like.device)
            parts.append(self.llm.get_input_embeddings()(bos))
        if self.config.use_input_mapping:
            parts += [mapped_embeds.to(like.dtype), self.boundary(batch_size).to(like.dtype)]
        return torch.cat(parts, dim=1)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_input_ids: torch.LongTensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        mapped_encoder_embeds: torch.Tensor | None = None,
        fused_kv: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            input_ids: `(batch, text_len)` LLM token ids of the text that follows the prefix (prompt and target),
                without BOS: the model puts `[BOS, mapped encoder tokens, boundary]` in front itself.
            attention_mask: `(batch, text_len)` for `input_ids`; while decoding with a cache, `(batch, past_text_len
                + text_len)` over all text seen so far. The prefix's mask comes from `encoder_attention_mask`.
            encoder_input_ids: `(batch, encoder_len)` source-text ids from the encoder's tokenizer. Not needed when
                `mapped_encoder_embeds` / `fused_kv` (from [`encode`]) are given.
            encoder_attention_mask: `(batch, encoder_len)`, 1 on real source tokens. Needed at every step of
                incremental decoding, since the cached prefix keeps its padding.
            mapped_encoder_embeds: `(batch, encoder_len, d_llm)` from [`encode`]; read on the first pass only.
            fused_kv: `(batch, num_adapted_layers, 2, num_kv_heads, encoder_len, head_dim)` from [`encode`].
            position_ids: `(batch, text_len)` positions of the text counted from its first token (what `generate`
                derives from `attention_mask`); the number of real prefix positions is added. Derived from the
                masks when omitted, so padding anywhere never shifts an example's positions.
            cache: the LLM's cache (`past_key_values` is accepted as the old name).
            labels: `(batch, text_len)` targets for `input_ids`, -100 where no loss is wanted (prompt, padding).

        Returns:
            The LLM's `CausalLMOutputWithPast` over the whole sequence it read: on the first pass `logits` has
            `num_prefix_positions(encoder_len) + text_len` positions (prefix first), then `text_len` per step.
        """
        self._use_fused_attention()
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if input_ids is not None:
            _check_token_ids("input_ids", input_ids)
            inputs_embeds = self.llm.get_input_embeddings()(input_ids)
        batch_size, text_len = inputs_embeds.shape[:2]
        past_len = cache.get_seq_length() if cache is not None else 0
        is_first_pass = past_len == 0

        mapped_encoder_embeds, fused_kv, encoder_attention_mask = self._encoder_side(
            encoder_input_ids, encoder_attention_mask, mapped_encoder_embeds, fused_kv, is_first_pass
        )
        if encoder_attention_mask.shape[0] != batch_size:
            raise ValueError(
                f"The encoder inputs hold {encoder_attention_mask.shape[0]} examples but the LLM inputs hold "
                f"{batch_size}; each example needs both."
            )

        prefix_mask = self._prefix_mask(encoder_attention_mask)
        prefix_len = prefix_mask.shape[1]
        if attention_mask is None:
            attention_mask = prefix_mask.new_ones(batch_size, past_len - (0 if is_first_pass else prefix_len) + text_len)
        full_mask = torch.cat([prefix_mask, attention_mask.to(prefix_mask.dtype)], dim=1)
        new_len = text_len + (prefix_len if is_first_pass else 0)
        if position_ids is None or position_ids.shape[-1] != text_len:
            # (`generate` cannot extend position ids of an empty prompt; the masks give the same positions.)
            position_ids = _positions_from_mask(full_mask)[:, -new_len:]
        else:
            position_ids = position_ids + prefix_mask.sum(dim=1, keepdim=True)
            if is_first_pass:
                position_ids = torch.cat([_positions_from_mask(prefix_mask), position_ids], dim=1)

        # The LLM reads each row with all its padding moved to the front (a stable sort of the mask), so padded
        # encoder tokens and left-padded prompts leave no holes inside the sequence: sliding-window layers then see
        # the same neighbours whatever the padding, and new tokens always follow the last real one.
        compact_mask, order = torch.sort(full_mask, dim=1, stable=True)
        if is_first_pass:
            prefix_embeds = self._prefix_embeds(mapped_encoder_embeds, batch_size, inputs_embeds)
            inputs_embeds = _gather_rows(torch.cat([prefix_embeds, inputs_embeds], dim=1), order)
            position_ids = _gather_rows(position_ids, order)
            if labels is not None:
                labels = _gather_rows(torch.cat([labels.new_full((batch_size, prefix_len), -100), labels], dim=1), order)

        fused_inputs = None
        if fused_kv is not None:
            fused_inputs = FusedAttentionInputs(
                key_value=fused_kv,
                encoder_mask=encoder_attention_mask.bool(),
                gates=self.gates(),
                slots={layer: slot for slot, layer in enumerate(self.config.adapted_llm_layers)},
                family=self.llm_family,
            )
        outputs = self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=compact_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            layalign_fused=fused_inputs,
            **kwargs,
        )
        if is_first_pass and outputs.logits is not None and outputs.logits.shape[1] == new_len:
            outputs.logits = _gather_rows(outputs.logits, order.argsort(dim=1))
        return outputs

    def _encoder_side(
        self,
        encoder_input_ids: torch.LongTensor | None,
        encoder_attention_mask: torch.Tensor | None,
        mapped_encoder_embeds: torch.Tensor | None,
        fused_kv: torch.Tensor | None,
        is_first_pass: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """`(mapped_encoder_embeds, fused_kv, encoder_attention_mask)` for this pass, encoding only what is missing.

        The mapped tokens are read on the first pass only; the fused keys and values at every pass. The mask defaults
        to all ones over the encoder length.
        """
        needs_mapped = is_first_pass and self.config.use_input_mapping and mapped_encoder_embeds is None
        needs_fused = self.config.use_layer_fusion and fused_kv is None
        if needs_mapped or needs_fused:
            if encoder_input_ids is None:
                raise ValueError(
                    "`encoder_input_ids` is required: LayAlign reads the source text through its encoder. Pass the "
                    "encoder tokenizer's ids (or `mapped_encoder_embeds` and `fused_kv` from `model.encode`)."
                )
            encoded = self.encode(encoder_input_ids, encoder_attention_mask)
            mapped_encoder_embeds = encoded.mapped_embeds if mapped_encoder_embeds is None else mapped_encoder_embeds
            fused_kv = encoded.fused_kv if fused_kv is None else fused_kv
            return mapped_encoder_embeds, fused_kv, encoded.attention_mask
        if encoder_attention_mask is not None:
            return mapped_encoder_embeds, fused_kv, encoder_attention_mask
        if encoder_input_ids is not None:
            return mapped_encoder_embeds, fused_kv, torch.ones_like(encoder_input_ids)
        if mapped_encoder_embeds is not None:
            batch_size, encoder_len, device = *mapped_encoder_embeds.shape[:2], mapped_encoder_embeds.device
        elif fused_kv is not None:
            batch_size, encoder_len, device = fused_kv.shape[0], fused_kv.shape[-2], fused_kv.device
        else:
            raise ValueError("`encoder_attention_mask` (or `encoder_input_ids`) is required while decoding with a cache.")
        return mapped_encoder_embeds, fused_kv, torch.ones(batch_size, encoder_len, dtype=torch.long, device=device)

    # -- generation -----------------------------------------------------------------------------------------------------

    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_input_ids: torch.LongTensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate`, with the encoder run once on the un-expanded batch.

        The encoder, the fusion and every adapted layer's k/v projection run here, once per call; their results go
        to the stock `generate` as batch-first tensors, which it repeats for beams / samples /
        `num_return_sequences` and hands to every decoding step. `input_ids` (the prompt, left-padded in batches)
        may be omitted to generate right after the boundary, as in stage-1 translation. The returned sequences are
        `input_ids` followed by the new tokens, decodable with the LLM's tokenizer.
        """
        if encoder_input_ids is None:
            raise ValueError("`encoder_input_ids` is required: LayAlign generates from the source text it encodes.")
        with torch.no_grad():
            encoded = self.encode(encoder_input_ids, encoder_attention_mask)
        if input_ids is None and "inputs_embeds" not in kwargs:
            # An empty prompt: generation starts right after the boundary. Handed over as zero-length embeddings,
            # the one empty input `generate` accepts.
            batch_size = encoder_input_ids.shape[0]
            embedding = self.llm.get_input_embeddings().weight
            kwargs["inputs_embeds"] = embedding.new_zeros(batch_size, 0, embedding.shape[1])
            attention_mask = encoded.attention_mask.new_zeros(batch_size, 0)
        for name, value in (("mapped_encoder_embeds", encoded.mapped_embeds), ("fused_kv", encoded.fused_kv)):
            if value is not None:
                kwargs[name] = value
        return super().generate(
            input_ids=input_ids, attention_mask=attention_mask, encoder_attention_mask=encoded.attention_mask, **kwargs
        )

    # -- saving and loading ---------------------------------------------------------------------------------------------

    def is_layalign_key(self, key: str) -> bool:
        """Whether a state-dict key belongs to the LayAlign modules (not to the encoder or the LLM)."""
        return key.split(".", 1)[0] in self.layalign_module_names

    def default_checkpoint_format(self) -> str:
        """`"layalign_only"` when both bases are frozen and named in the config, else `"full"`."""
        frozen = not (self.config.train_encoder or self.config.train_llm)
        named = bool(self.config.encoder_name_or_path and self.config.llm_name_or_path)
        return "layalign_only" if frozen and named else "full"

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *args,
        checkpoint_format: str | None = None,
        state_dict: dict | None = None,
        **kwargs,
    ) -> None:
        """`PreTrainedModel.save_pretrained` with a choice of what the checkpoint holds.

        Args:
            checkpoint_format: `"layalign_only"` (the config and the LayAlign modules; the bases reload from
                `encoder_name_or_path` / `llm_name_or_path`) or `"full"` (every weight). Defaults to
                [`default_checkpoint_format`], so `Trainer` checkpoints of frozen-base training are small.

        The files are written to a temporary folder next to `save_directory` and moved in with `config.json` last,
        so an interrupted save never leaves a folder that loads a mix of old and new files.
        """
        checkpoint_format = checkpoint_format or self.default_checkpoint_format()
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"`checkpoint_format` must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}.")
        if checkpoint_format == "layalign_only":
            if not (self.config.encoder_name_or_path and self.config.llm_name_or_path):
                raise ValueError(
                    "A LayAlign-only checkpoint needs `config.encoder_name_or_path` and `config.llm_name_or_path` to "
                    "reload the bases from; set them or save with `checkpoint_format='full'`."
                )
            state_dict = self.state_dict() if state_dict is None else state_dict
            state_dict = {key: value for key, value in state_dict.items() if self.is_layalign_key(key)}
        self.config.checkpoint_format = checkpoint_format
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": _class_reference(type(self))}
        save_directory = Path(save_directory)
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", save_directory.name)
        save_directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{save_directory.name}.", dir=save_directory.parent))
        try:
            super().save_pretrained(staging, *args, state_dict=state_dict, **kwargs)
            _replace_folder_contents(staging, save_directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, config=None, **kwargs):
        """Loads either checkpoint form, from a folder or the Hub.

        A full checkpoint loads like any transformers model. A LayAlign-only one first loads the encoder and the LLM
        from the sources its config names, or from `encoder_name_or_path=` / `llm_name_or_path=` given here (`dtype`,
        `device_map`, `attn_implementation`, `quantization_config` and the download options apply to them), then the
        LayAlign weights, and fails if any LayAlign weight is missing or unexpected: plain
        `PreTrainedModel.from_pretrained` would silently give random bases instead.
        """
        if not isinstance(config, PretrainedConfig):
            file_kwargs = {key: kwargs[key] for key in ("revision", "subfolder", *_SHARED_LOAD_KWARGS) if key in kwargs}
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **file_kwargs)
        for source_field in ("encoder_name_or_path", "llm_name_or_path"):
            # The bases of a LayAlign-only checkpoint may live elsewhere on this machine than where they were trained.
            if (source := kwargs.pop(source_field, None)) is not None:
                setattr(config, source_field, os.fspath(source))
        if config.checkpoint_format != "layalign_only":
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        return cls._from_layalign_only(pretrained_model_name_or_path, config, **kwargs)

    @classmethod
    def _from_layalign_only(cls, path: str | os.PathLike, config: LayAlignConfig, **kwargs) -> "LayAlignForCausalLM":
        file_kwargs = {key: kwargs.pop(key) for key in _LAYALIGN_FILE_KWARGS if key in kwargs}
        shared = {key: kwargs[key] for key in _SHARED_LOAD_KWARGS if key in kwargs}
        download = {**shared, **{key: file_kwargs[key] for key in ("revision", "subfolder") if key in file_kwargs}}
        weights_file = cached_file(path, SAFE_WEIGHTS_NAME, **download)
        logger.info(
            f"{path} holds the LayAlign weights only: loading the encoder from {config.encoder_name_or_path} and the "
            f"LLM from {config.llm_name_or_path} first."
        )
        encoder_kwargs, llm_kwargs = dict(kwargs), dict(kwargs)
        if isinstance(implementation := kwargs.get("attn_implementation"), dict):
            # Routed by sub-config name, as `from_pretrained` routes it for a full checkpoint.
            for base_kwargs, key in ((encoder_kwargs, "encoder_config"), (llm_kwargs, "text_config")):
                base_kwargs.pop("attn_implementation")
                if key in implementation:
                    base_kwargs["attn_implementation"] = implementation[key]
        model = cls.from_base_models(
            config.encoder_name_or_path,
            config.llm_name_or_path,
            config=config,
            encoder_kwargs=encoder_kwargs,
            llm_kwargs=llm_kwargs,
        )
        model.load_layalign_state_dict(load_state_dict(weights_file))
        generation_file = cached_file(
            path, "generation_config.json", _raise_exceptions_for_missing_entries=False, **download
        )
        if generation_file is not None:
            model.generation_config = GenerationConfig.from_pretrained(path, **download)
        model.eval()
        return model

    def load_layalign_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Loads the LayAlign modules' weights; raises if one is missing or a key is not a LayAlign weight."""
        unexpected = sorted(key for key in state_dict if not self.is_layalign_key(key))
        if unexpected:
            raise ValueError(f"A LayAlign-only checkpoint must hold LayAlign weights only; it also holds {unexpected[:5]}.")
        result = self.load_state_dict(state_dict, strict=False)
        missing = sorted(key for key in result.missing_keys if self.is_layalign_key(key))
        if missing or result.unexpected_keys:
            raise ValueError(
                f"The LayAlign checkpoint does not fit this model: missing {missing}, unexpected "
                f"{sorted(result.unexpected_keys)}."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def _positions_from_mask(mask: torch.Tensor) -> torch.LongTensor:
    """Position of each token among the real tokens of its row; padding takes no position (and gets 0)."""
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _gather_rows(values: torch.Tensor, order: torch.LongTensor) -> torch.Tensor:
    """`values[b, order[b, t]]` for `values` of shape `(batch, length, ...)` and `order` of shape `(batch, length)`."""
    index = order.view(*order.shape, *([1] * (values.dim() - 2))).expand(*order.shape, *values.shape[2:])
    return values.gather(1, index)


def _check_token_ids(name: str, ids: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"`{name}` must be a 2-D tensor of token ids (batch, length), got {_describe(ids)}.")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold integer token ids, got dtype {ids.dtype}.")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _hub_kwargs(kwargs: dict) -> dict:
    return {key: kwargs[key] for key in (*_SHARED_LOAD_KWARGS, "revision", "subfolder", "trust_remote_code") if key in kwargs}


def _base_model_source(model: PreTrainedModel) -> str | None:
    """Where a loaded base model came from, as an absolute path for local folders; `None` when built from a config."""
    source = model.config._name_or_path
    if not source:
        return None
    return os.path.abspath(source) if os.path.isdir(source) else source


def _check_base_matches(expected, loaded, source_field: str) -> None:
    for attribute in ("model_type", "hidden_size", "num_hidden_layers"):
        if getattr(expected, attribute) != getattr(loaded, attribute):
            raise ValueError(
                f"The base model loaded from `{source_field}` has {attribute}={getattr(loaded, attribute)!r}, but the "
                f"LayAlign checkpoint was trained on {attribute}={getattr(expected, attribute)!r}."
            )


def _class_reference(cls: type) -> str:
    """`module_file.ClassName`, the form of an `auto_map` entry."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def _replace_folder_contents(staging: Path, target: Path) -> None:
    """Moves a finished save from `staging` into `target`, `config.json` last.

    The old `config.json` goes first, so that from then until the new one lands the folder does not load at all;
    weight files of an earlier save that the new one does not have are removed.
    """
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").unlink(missing_ok=True)
    new_files = {path.name for path in staging.iterdir()}
    for stale in target.iterdir():
        if stale.is_file() and stale.name not in new_files and stale.name.startswith("model") and ".safetensors" in stale.name:
            stale.unlink()
    for path in sorted(staging.iterdir(), key=lambda item: item.name == "config.json"):
        os.replace(path, target / path.name)


LayAlignForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["LayAlignPreTrainedModel", "LayAlignForCausalLM", "LayAlignEncoderOutput"]
