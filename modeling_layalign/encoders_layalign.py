"""The encoder families LayAlign reads, keyed by `model_type`: how to build, load and run each one.

The reference code takes `AutoModel.from_pretrained(...).get_encoder()` for mT5 and the model itself for BERT-style
and decoder-only encoders, choosing by substrings of the checkpoint path (`LayAlign.__init__` in `LayAlign.py`); the
table below makes that choice by `model_type`, and adds position ids that skip left padding for decoder-only
encoders.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AutoModel, AutoModelForTextEncoding, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.m2m_100.modeling_m2m_100 import M2M100Encoder, M2M100Model

from .attention_layalign import LLM_FAMILIES


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
        unused_checkpoint_keys: patterns of weights that the family's usual checkpoints hold and LayAlign never
            builds (mT5's decoder, BERT's pooler and pretraining heads): expected, so not reported at load time.
        position_offset: for encoders with a learned table of absolute positions, the first row a token uses (0
            for BERT; RoBERTa and XLM-R start after their padding id), so that longer inputs are refused with a
            clear error instead of an index error inside the encoder. `None`: no such limit.
    """

    model_class: type
    pretrained_class: type
    takes_encoder: bool = False
    causal: bool = False
    model_kwargs: dict = field(default_factory=dict)
    unused_checkpoint_keys: tuple[str, ...] = ()
    position_offset: Callable[[PretrainedConfig], int] | None = None

    def max_length(self, config: PretrainedConfig) -> int | None:
        """The most tokens one input may hold, or `None` where the encoder sets no limit."""
        if self.position_offset is None:
            return None
        return config.max_position_embeddings - self.position_offset(config)

    def encoder_class(self, config) -> type:
        """The class of the encoder module for `config`, the same whether built from a config or loaded."""
        mapping = getattr(self.model_class, "_model_mapping", None)
        return mapping[type(config)] if mapping is not None else self.model_class

    def build(self, config) -> PreTrainedModel:
        """The encoder with random weights (or on the meta device, inside `from_pretrained`)."""
        return self.encoder_class(config)._from_config(config, **self.model_kwargs)

    def from_pretrained(self, source, config: PretrainedConfig, **kwargs) -> PreTrainedModel:
        """Loads the checkpoint `source` (whose config is `config`), without reporting the weights in
        `unused_checkpoint_keys`."""
        loaded_class = self.encoder_class(config) if self.pretrained_class is self.model_class else self.pretrained_class
        ignored = loaded_class._keys_to_ignore_on_load_unexpected
        # Read from the class when the model is built, i.e. inside this call only.
        loaded_class._keys_to_ignore_on_load_unexpected = [*(ignored or []), *self.unused_checkpoint_keys]
        try:
            return loaded_class.from_pretrained(source, **self.model_kwargs, **kwargs)
        finally:
            loaded_class._keys_to_ignore_on_load_unexpected = ignored

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


_BIDIRECTIONAL = EncoderFamily(
    AutoModelForTextEncoding, AutoModelForTextEncoding, unused_checkpoint_keys=(r"^decoder\.", r"^lm_head\.")
)
_BERT_UNUSED = (r"(^|\.)pooler\.", r"^cls\.", r"^lm_head\.")
_BERT = EncoderFamily(
    AutoModelForTextEncoding, AutoModelForTextEncoding, model_kwargs={"add_pooling_layer": False},
    unused_checkpoint_keys=_BERT_UNUSED, position_offset=lambda config: 0,
)  # fmt: skip
_ROBERTA = EncoderFamily(
    AutoModelForTextEncoding, AutoModelForTextEncoding, model_kwargs={"add_pooling_layer": False},
    unused_checkpoint_keys=_BERT_UNUSED, position_offset=lambda config: config.pad_token_id + 1,
)  # fmt: skip
_NLLB = EncoderFamily(M2M100Encoder, M2M100Model, takes_encoder=True)
_DECODER_ONLY = EncoderFamily(AutoModel, AutoModel, causal=True)

ENCODER_FAMILIES: dict[str, EncoderFamily] = {
    "t5": _BIDIRECTIONAL,
    "mt5": _BIDIRECTIONAL,
    "umt5": _BIDIRECTIONAL,
    "bert": _BERT,
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "m2m_100": _NLLB,
    **{model_type: _DECODER_ONLY for model_type in LLM_FAMILIES},
}



def mapped_encoder_states(encoded: BaseModelOutput, config: PretrainedConfig) -> torch.Tensor:
    """`(batch, encoder_len, d_enc)`: the encoder states the input mapping reads, those of the LayAlign config's
    `mapped_encoder_layer` in `encoded.hidden_states`, or the encoder's final output where that is `None` (the
    paper's choice)."""
    layer = config.mapped_encoder_layer
    return encoded.last_hidden_state if layer is None else encoded.hidden_states[layer]


def encoder_family(config) -> EncoderFamily:
    """Returns the family of an encoder config, or raises a `ValueError` naming the supported ones."""
    if config.model_type not in ENCODER_FAMILIES:
        raise ValueError(
            f"LayAlign does not support the encoder family {config.model_type!r}; "
            f"supported: {sorted(ENCODER_FAMILIES)}."
        )
    return ENCODER_FAMILIES[config.model_type]

