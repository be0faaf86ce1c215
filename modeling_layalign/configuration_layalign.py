"""Configuration of LayAlign: a frozen multilingual encoder fused layer by layer into a frozen LLM."""

import difflib
from typing import Literal, get_args

from transformers import AutoConfig, GenerationConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging


logger = logging.get_logger(__name__)

FusionStructure = Literal["linear", "mlp"]
CheckpointFormat = Literal["layalign_only", "full"]
FUSION_STRUCTURES = get_args(FusionStructure)
# The two pretrained models a LayAlign model joins, as `modified_bases` names them.
BASES = ("encoder", "llm")
CHECKPOINT_FORMATS = get_args(CheckpointFormat)
# Keyword arguments that reach `__post_init__` without being fields and are not typos: what a saved `config.json`
# carries besides the fields, and what `PretrainedConfig.__post_init__` itself consumes.
_KNOWN_EXTRA_KWARGS = {
    "auto_map", "custom_pipelines", "model_type", "transformers_version", "torch_dtype", "num_labels", "name_or_path", "_commit_hash",
    "output_attentions", "attn_implementation", "experts_implementation", "per_layer_config", "rope_scaling",
    "rope_theta", *GenerationConfig._get_default_generation_params(),
}  # fmt: skip


class LayAlignConfig(PretrainedConfig):
    r"""
    Configuration of a [`LayAlignForCausalLM`]: which encoder and LLM it joins, which of their layers take part,
    and which parts train.

    Args:
        encoder_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the multilingual encoder (mT5 / T5 / umT5, XLM-R / BERT-style, NLLB / M2M100, or a decoder-only
            LM whose hidden states serve as encodings). Defaults to a default `MT5Config`.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the English-centric LLM (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3). Defaults to a default
            `LlamaConfig`. Named `text_config` because generation utilities look the LLM's config up under that name.
        encoder_name_or_path (`str`, *optional*):
            Hub id or folder the encoder's weights come from. A LayAlign-only checkpoint loads them from here.
        llm_name_or_path (`str`, *optional*):
            Hub id or folder the LLM's weights come from. A LayAlign-only checkpoint loads them from here.
        fused_encoder_layers (`list[int]`, *optional*):
            Indices into the encoder's hidden states (0 is the embedding output, `N` the final output of an `N`-layer
            encoder) that the layer-wise fusion mixes. Defaults to `0..N-1`, every state except the final output, as
            in the paper; the final output feeds the input mapping (see `mapped_encoder_layer`).
        mapped_encoder_layer (`int`, *optional*):
            Index into the encoder's hidden states (as `fused_encoder_layers` counts them) that the input mapping
            reads. Defaults to the encoder's final output, as in the paper (and MindMerger), whose mT5 encoder keeps
            its tokens apart there. Not in the paper: an encoder trained for pooled sentence embeddings, such as
            multilingual-e5, spends its last layer on one shared direction (65% of its states' energy, against 26%
            at layer 8 of 12, `docs/learning.md`), and its input mapping carries a source's content to the LLM better
            from a middle layer.
        adapted_llm_layers (`list[int]`, *optional*):
            Indices of the LLM layers that get the gated fusion-enhanced attention. Defaults to all of them.
        fusion_structure (`str`, *optional*, defaults to `"linear"`):
            `"linear"`: layer-axis `Linear(N_enc, 2M)`, ReLU, shared `Linear(d_enc, d_llm)`. `"mlp"` adds a ReLU and a
            `Linear(d_llm, d_llm)` after that.
        use_input_mapping (`bool`, *optional*, defaults to `True`):
            Put the mapped encoder states and the learned boundary vector in front of the LLM input. Off: the
            LLM input is `[BOS, text]` and the encoder reaches the LLM through the fused attention alone.
        use_layer_fusion (`bool`, *optional*, defaults to `True`):
            Give the adapted LLM layers the gated fusion-enhanced attention. Off: the model is exactly MindMerger.
        train_encoder (`bool`, *optional*, defaults to `False`):
            Whether the encoder's weights are trainable. Frozen in both of the paper's stages.
        train_llm (`bool`, *optional*, defaults to `False`):
            Whether the LLM's weights are trainable (full fine-tuning; for LoRA keep this off and use peft).
        encoder_dropout_in_training (`bool`, *optional*, defaults to `True`):
            Keep the encoder's dropout active while the model is in training mode, even when the encoder is frozen,
            as the reference implementation does. Off: the encoder always runs in eval mode.
        modified_bases (`list[str]`, *optional*):
            The bases (`"encoder"`, `"llm"`) whose weights are no longer those of the source their
            `*_name_or_path` names: one that trains (`train_encoder` / `train_llm`), has LoRA merged into it, or had
            its vocabulary resized. A model with a modified base saves full checkpoints, since reloading that base
            from its source would lose what changed; the source stays named as where the base came from. Absent
            from checkpoints saved before 2026-12-06: a full one of those counts both bases as modified.
        checkpoint_format (`str`, *optional*):
            Written by `save_pretrained`: `"layalign_only"` when the checkpoint holds only the LayAlign modules (the
            base weights load from `encoder_name_or_path` / `llm_name_or_path`), `"full"` when it holds everything.
        base_fingerprints (`dict`, *optional*):
            Written by `save_pretrained` for a LayAlign-only checkpoint: a few values of a few weights of each base
            (`{"encoder": {...}, "llm": {...}}`), so that `from_pretrained` refuses a base of the same shape but other
            weights (a LayAlign trained on MetaMath-7B loaded over Llama-2-7B).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the LayAlign linear layers.
    """

    model_type = "layalign"
    sub_configs_defaults = {
        "encoder_config": SubConfigSpec(AutoConfig, model_type="mt5"),
        "text_config": SubConfigSpec(AutoConfig, model_type="llama"),
    }

    encoder_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    encoder_name_or_path: str | None = None
    llm_name_or_path: str | None = None
    fused_encoder_layers: list[int] | None = None
    mapped_encoder_layer: int | None = None
    adapted_llm_layers: list[int] | None = None
    fusion_structure: FusionStructure = "linear"
    use_input_mapping: bool = True
    use_layer_fusion: bool = True
    train_encoder: bool = False
    train_llm: bool = False
    encoder_dropout_in_training: bool = True
    modified_bases: list[str] | None = None
    checkpoint_format: CheckpointFormat | None = None
    base_fingerprints: dict | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self._warn_about_unknown_fields(kwargs)
        super().__post_init__(**kwargs)
        if self.fused_encoder_layers is None:
            self.fused_encoder_layers = list(range(self.encoder_config.num_hidden_layers))
        if self.adapted_llm_layers is None:
            self.adapted_llm_layers = list(range(self.text_config.num_hidden_layers))
        self.validate_architecture()

    def validate_architecture(self):
        """Checks every field against the others and the two sub-configs; raises a `ValueError` naming the field.

        Normalises the layer lists to sorted lists of distinct ints.
        """
        super().validate_architecture()
        self.fused_encoder_layers = _checked_layer_list(
            "fused_encoder_layers", self.fused_encoder_layers, self.encoder_config.num_hidden_layers + 1
        )
        self.adapted_llm_layers = _checked_layer_list(
            "adapted_llm_layers", self.adapted_llm_layers, self.text_config.num_hidden_layers
        )
        layer, num_states = self.mapped_encoder_layer, self.encoder_config.num_hidden_layers + 1
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_states):
            raise ValueError(f"`mapped_encoder_layer` must be None or a layer index in 0..{num_states - 1}, got {layer!r}.")
        if self.fusion_structure not in FUSION_STRUCTURES:
            raise ValueError(f"`fusion_structure` must be one of {FUSION_STRUCTURES}, got {self.fusion_structure!r}.")
        if self.modified_bases is not None:
            if isinstance(self.modified_bases, str) or not set(self.modified_bases) <= set(BASES):
                raise ValueError(f"`modified_bases` must be a list of {BASES}, got {self.modified_bases!r}.")
            self.modified_bases = sorted(set(self.modified_bases))
        if self.checkpoint_format is not None and self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"`checkpoint_format` must be one of {CHECKPOINT_FORMATS} or None, got {self.checkpoint_format!r}."
            )
        for name in (
            "use_input_mapping",
            "use_layer_fusion",
            "train_encoder",
            "train_llm",
            "encoder_dropout_in_training",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        if not (self.use_input_mapping or self.use_layer_fusion):
            raise ValueError(
                "At least one of `use_input_mapping` and `use_layer_fusion` must be True, or the encoder is unused."
            )

    def _warn_about_unknown_fields(self, kwargs: dict) -> None:
        """Warns about keyword arguments that are no field of this config, naming the nearest field: a typo such as
        `adapted_llm_layer=[0]` would otherwise be stored silently and the default used instead."""
        fields = sorted(name for name in self.__dataclass_fields__ if not name.startswith("_"))
        for name in sorted(set(kwargs) - _KNOWN_EXTRA_KWARGS):
            nearest = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean `{nearest[0]}`?" if nearest else f". LayAlign's fields: {', '.join(LAYALIGN_FIELDS)}."
            logger.warning(f"`LayAlignConfig` has no field `{name}`: it is stored but nothing reads it{hint}")


def _checked_layer_list(name: str, layers, num_layers: int) -> list[int]:
    """Returns `layers` as a sorted list of distinct ints in `[0, num_layers)`, or raises a `ValueError` naming `name`."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"`{name}` must be a list of layer indices, got {layers!r}.")
    layers = list(layers)
    if not layers:
        raise ValueError(f"`{name}` must name at least one layer, got an empty list.")
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"`{name}` must hold ints, got {index!r}.")
        if not 0 <= index < num_layers:
            raise ValueError(f"`{name}` holds {index}, outside the valid range 0..{num_layers - 1}.")
    if len(set(layers)) != len(layers):
        raise ValueError(f"`{name}` names a layer twice: {layers}.")
    return sorted(layers)


LAYALIGN_FIELDS = tuple(name for name in LayAlignConfig.__annotations__ if not name.startswith("_"))

LayAlignConfig.register_for_auto_class()

__all__ = ["LayAlignConfig"]
