"""Saving and loading LayAlign checkpoints: the LayAlign-only and full forms.

The reference code saves the whole model, frozen bases included, as one pickled `pytorch_model.bin`
(`accelerator.save_model(..., safe_serialization=False)` in `finetune.py`). Here a checkpoint whose bases stay
frozen holds the LayAlign modules only (a few MB of safetensors) and a config naming the two bases, which
`from_pretrained` loads first.
"""

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_utils import load_state_dict
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file, logging
from transformers.utils.hub import get_checkpoint_shard_files

from .bases_layalign import (
    base_fingerprint,
    base_model_source,
    check_base_fingerprint,
    check_base_matches,
    check_base_source,
)
from .configuration_layalign import BASES, CHECKPOINT_FORMATS, LayAlignConfig
from .encoders_layalign import encoder_family
from .legacy_layalign import load_gates_of_full_checkpoint
from .pipeline_layalign import custom_pipelines_entry
from .saving_layalign import LORA_SUBFOLDER, interrupted_save_location, save_atomically


logger = logging.get_logger(__name__)

# Keyword arguments of `from_pretrained` that locate the LayAlign files themselves.
LAYALIGN_FILE_KWARGS = ("revision", "subfolder", "code_revision", "trust_remote_code", "_from_auto", "adapter_kwargs")
# Keyword arguments of `from_pretrained` that also apply to loading the base models.
SHARED_LOAD_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token")


class LayAlignCheckpointMixin:
    """Building from pretrained bases, and `save_pretrained` / `from_pretrained` in both checkpoint forms.

    Mixed into [`LayAlignForCausalLM`] in front of `PreTrainedModel`; it reads the model's `config` and
    `layalign_module_names`.
    """

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
    ) -> PreTrainedModel:
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
                encoder_name_or_path=base_model_source(encoder),
                llm_name_or_path=base_model_source(llm),
                **config_kwargs,
            )
        else:
            check_base_matches(config.encoder_config, encoder.config, "encoder_name_or_path")
            check_base_matches(config.text_config, llm.config, "llm_name_or_path")
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
            config = AutoConfig.from_pretrained(encoder, **hub_kwargs(kwargs))
            encoder = encoder_family(config).from_pretrained(encoder, config, **kwargs)
        return encoder_family(encoder.config).encoder_part(encoder)

    def is_layalign_key(self, key: str) -> bool:
        """Whether a state-dict key belongs to the LayAlign modules (not to the encoder or the LLM)."""
        return key.split(".", 1)[0] in self.layalign_module_names

    def default_checkpoint_format(self) -> str:
        """`"layalign_only"` when both bases are named in the config and neither is modified (see
        [`mark_base_modified`]), else `"full"`."""
        named = bool(self.config.encoder_name_or_path and self.config.llm_name_or_path)
        return "layalign_only" if named and not self.config.modified_bases else "full"

    def mark_base_modified(self, base: str, reason: str) -> None:
        """Records in `config.modified_bases` that the weights of `base` (`"encoder"` or `"llm"`) are no longer those
        of the source its config names, so that every later save holds them (`checkpoint_format="full"`).

        The model calls it itself when a base trains (`train_encoder` / `train_llm`) or the LLM's vocabulary is
        resized; call it after changing a base's weights in any other way, such as peft's `merge_and_unload` of a
        LoRA on the LLM (`train_layalign.py --lora_r` does).
        """
        if base not in BASES:
            raise ValueError(f"`base` must be one of {BASES}, got {base!r}.")
        if base not in self.config.modified_bases:
            self.config.modified_bases = sorted([*self.config.modified_bases, base])
            source = getattr(self.config, f"{base}_name_or_path")
            logger.info(
                f"The {base}'s weights are no longer those of {source!r} ({reason}): checkpoints of this model hold "
                "every weight (`checkpoint_format='full'`)."
            )

    def resize_token_embeddings(self, *args, **kwargs) -> torch.nn.Embedding:
        """`PreTrainedModel.resize_token_embeddings` on the LLM (new tokens in its tokenizer).

        The LLM then differs from the one `config.llm_name_or_path` names, which a LayAlign-only checkpoint would
        reload: it counts as modified, so later saves hold every weight (`checkpoint_format="full"`); resizing to the
        size it has changes nothing. The resized embeddings stay frozen unless the LLM trains.
        """
        size = self.get_input_embeddings().weight.shape[0]
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        if embeddings.weight.shape[0] != size:
            self.mark_base_modified("llm", "its vocabulary was resized")
        self.apply_trainable_parts()
        return embeddings

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

        The files are written to a hidden folder next to `save_directory` (`.NAME.saving-*`), which then takes the
        old folder's place by renaming whole folders: an interrupted save never leaves a folder that loads a mix of
        old and new files, and never loses the old checkpoint before the new one is complete.

        What a save replaces and what it keeps, when `save_directory` already holds a checkpoint: every file that
        transformers loads as part of a model or its processor is replaced or removed (config, generation config,
        weights, peft adapters, processor, tokenizer, chat-template and vocabulary files, and subfolders holding a
        tokenizer; see `saving_layalign.MODEL_FILE_PATTERNS`), so nothing of the old model is loaded beside the new one: save the
        processor again after the model. Everything else is kept (a Trainer's `checkpoint-*` folders, logs,
        evaluation results, a model card). A `save_directory` that is a file is refused before anything moves. A save
        killed between its two renames leaves the old checkpoint in `.NAME.old-*`: the next save puts it back first
        (and removes the hidden folders of killed saves); loading names where it is.
        """
        save_directory = Path(save_directory)
        if save_directory.exists() and not save_directory.is_dir():
            raise NotADirectoryError(
                f"`save_directory` {os.fspath(save_directory)!r} is a file, not a folder: pass a folder path (the file "
                "is left as it is)."
            )
        if getattr(self, "_hf_peft_config_loaded", False):
            raise ValueError(
                "This model carries a LoRA adapter (`load_adapter`, or the `lora/` folder of the checkpoint it was "
                "loaded from), which neither checkpoint form holds: save the adapter with peft (`train_layalign.py` "
                f"does, into `{LORA_SUBFOLDER}/`), or load the checkpoint with `load_lora=False`."
            )
        checkpoint_format = checkpoint_format or self.default_checkpoint_format()
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"`checkpoint_format` must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}.")
        if checkpoint_format == "layalign_only":
            if not (self.config.encoder_name_or_path and self.config.llm_name_or_path):
                raise ValueError(
                    "A LayAlign-only checkpoint needs `config.encoder_name_or_path` and `config.llm_name_or_path` to "
                    "reload the bases from; set them or save with `checkpoint_format='full'`."
                )
            if self.config.modified_bases:
                raise ValueError(
                    f"`checkpoint_format='layalign_only'` would lose the weights of the modified {self.config.modified_bases} "
                    "(see `config.modified_bases`): reloading from the named sources gives the unmodified bases. Save "
                    "with `checkpoint_format='full'` (the default for this model)."
                )
            gathered, state_dict = state_dict, self.state_dict() if state_dict is None else state_dict
            self.config.base_fingerprints = {
                "encoder": base_fingerprint(self.encoder, gathered, prefix="encoder."),
                "llm": base_fingerprint(self.llm, gathered, prefix="llm."),
            }
            state_dict = {key: value for key, value in state_dict.items() if self.is_layalign_key(key)}
        else:
            self.config.base_fingerprints = None
        self.config.checkpoint_format = checkpoint_format
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": _class_reference(type(self))}
        # `pipeline("text-generation", model=<this folder>, trust_remote_code=True)` then runs `pipeline_layalign.py`.
        self.config.custom_pipelines = custom_pipelines_entry()
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", save_directory.name)
        save = super().save_pretrained
        save_atomically(save_directory, lambda folder: save(folder, *args, state_dict=state_dict, **kwargs))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, config=None, **kwargs):
        """Loads either checkpoint form, from a folder or the Hub.

        A full checkpoint loads like any transformers model. A LayAlign-only one first loads the encoder and the LLM
        from the sources its config names, or from `encoder_name_or_path=` / `llm_name_or_path=` given here (`dtype`,
        `device_map`, `attn_implementation`, `quantization_config` and the download options apply to them), checks
        that their weights are the ones it was saved with (`check_base_weights=False` skips this), then loads the
        LayAlign weights, and fails if any LayAlign weight is missing or unexpected: plain
        `PreTrainedModel.from_pretrained` would silently give random bases instead. A base trained quantized loads
        quantized again (see [`base_load_kwargs`] for the per-base arguments `encoder_kwargs=` / `llm_kwargs=`), and a
        LoRA kept in the checkpoint's `lora/` folder is attached with transformers' `load_adapter`
        (`load_lora=False` leaves it out).
        """
        folder = Path(pretrained_model_name_or_path)
        if not folder.exists() and (previous := interrupted_save_location(folder)) is not None:
            raise OSError(
                f"{os.fspath(folder)!r} does not exist: a save into it was killed between its two renames, and the "
                f"previous checkpoint is in {os.fspath(previous)!r}. Load it from there, move it back, or save again to "
                f"{os.fspath(folder)!r} (a save puts it back first)."
            )
        if not isinstance(config, PretrainedConfig) and folder.is_dir() and not (folder / "config.json").is_file():
            raise OSError(
                f"{os.fspath(folder)!r} is not a LayAlign checkpoint: it holds no config.json (an interrupted save "
                "leaves none, so that a half-written checkpoint never loads)."
            )
        if folder.is_dir() and (stray := sorted(path.name for path in folder.glob("adapter_*"))):
            raise OSError(
                f"{os.fspath(folder)!r} holds peft adapter files ({', '.join(stray)}) that no LayAlign save writes "
                "(a save removes them, and a LoRA run saves its adapters merged): transformers would attach them "
                "silently. Remove them, or load that adapter explicitly with peft."
            )
        if not isinstance(config, PretrainedConfig):
            file_kwargs = {key: kwargs[key] for key in ("revision", "subfolder", *SHARED_LOAD_KWARGS) if key in kwargs}
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **file_kwargs)
        for source_field in ("encoder_name_or_path", "llm_name_or_path"):
            # The bases of a LayAlign-only checkpoint may live elsewhere on this machine than where they were trained.
            if (source := kwargs.pop(source_field, None)) is not None:
                setattr(config, source_field, os.fspath(source))
        check_base_weights = kwargs.pop("check_base_weights", True)
        load_lora = kwargs.pop("load_lora", True)
        if config.checkpoint_format != "layalign_only":
            # Saved before `modified_bases` existed: whether its bases still equal their sources is unknown.
            saved_before_modified_bases = config.modified_bases is None
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
            download = {key: kwargs[key] for key in ("revision", "subfolder", *SHARED_LOAD_KWARGS) if key in kwargs}
            model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) on request
            load_gates_of_full_checkpoint(model, pretrained_model_name_or_path, download)
            if saved_before_modified_bases:
                for base in BASES:
                    model.mark_base_modified(base, "a full checkpoint saved before `modified_bases` was recorded")
            # Loading replaces every parameter, trainable or not: the config says which parts train.
            model.apply_trainable_parts()
            return loaded
        return cls._from_layalign_only(pretrained_model_name_or_path, config, check_base_weights, load_lora, **kwargs)

    @classmethod
    def _from_layalign_only(
        cls, path: str | os.PathLike, config: LayAlignConfig, check_base_weights: bool, load_lora: bool, **kwargs
    ) -> PreTrainedModel:
        file_kwargs = {key: kwargs.pop(key) for key in LAYALIGN_FILE_KWARGS if key in kwargs}
        shared = {key: kwargs[key] for key in SHARED_LOAD_KWARGS if key in kwargs}
        download = {**shared, **{key: file_kwargs[key] for key in ("revision", "subfolder") if key in file_kwargs}}
        weights_files = layalign_weight_files(path, download)
        logger.info(
            f"{path} holds the LayAlign weights only: loading the encoder from {config.encoder_name_or_path} and the "
            f"LLM from {config.llm_name_or_path} first."
        )
        for source_field, role in (("encoder_name_or_path", "encoder"), ("llm_name_or_path", "LLM")):
            check_base_source(getattr(config, source_field), source_field, role, shared)
        encoder_kwargs, llm_kwargs = base_load_kwargs(config, kwargs)
        model = cls.from_base_models(
            config.encoder_name_or_path,
            config.llm_name_or_path,
            config=config,
            encoder_kwargs=encoder_kwargs,
            llm_kwargs=llm_kwargs,
        )
        if check_base_weights and config.base_fingerprints:
            check_base_fingerprint(model.encoder, config.base_fingerprints["encoder"], "encoder_name_or_path")
            check_base_fingerprint(model.llm, config.base_fingerprints["llm"], "llm_name_or_path")
        model.load_layalign_state_dict({key: value for file in weights_files for key, value in load_state_dict(file).items()})
        # Where it came from, as `PreTrainedModel.from_pretrained` records it (peft names an adapter's base by it).
        model.config.name_or_path = model.name_or_path = os.fspath(path)
        generation_file = cached_file(
            path, "generation_config.json", _raise_exceptions_for_missing_entries=False, **download
        )
        if generation_file is not None:
            model.generation_config = GenerationConfig.from_pretrained(path, **download)
        lora_folder = f"{file_kwargs.get('subfolder') or ''}/{LORA_SUBFOLDER}".lstrip("/")
        lora = {**download, "subfolder": lora_folder}
        if load_lora and cached_file(path, "adapter_config.json", _raise_exceptions_for_missing_entries=False, **lora):
            model.load_adapter(os.fspath(path), adapter_kwargs=lora)
        model.eval()
        return model

    def load_layalign_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Loads the LayAlign modules' weights; raises if one is missing or a key is not a LayAlign weight."""
        unexpected = sorted(key for key in state_dict if not self.is_layalign_key(key))
        if unexpected:
            raise ValueError(f"A LayAlign-only checkpoint must hold LayAlign weights only; it also holds {unexpected[:5]}.")
        expected = {
            f"{name}.{key}": value
            for name in self.layalign_module_names
            if (module := getattr(self, name)) is not None
            for key, value in module.state_dict().items()
        }
        misshaped = [
            f"`{key}` {tuple(value.shape)} (this model: {tuple(expected[key].shape)})"
            for key, value in state_dict.items()
            if key in expected and value.shape != expected[key].shape
        ]
        if misshaped:
            raise ValueError(
                f"The LayAlign checkpoint's weights do not have the shapes its config gives them: {', '.join(misshaped)}. "
                "The config's `fused_encoder_layers`, `adapted_llm_layers` and `fusion_structure` (and the bases' "
                "widths) decide them: the config.json beside these weights does not describe them."
            )
        result = self.load_state_dict(state_dict, strict=False)
        missing = sorted(key for key in result.missing_keys if self.is_layalign_key(key))
        if missing or result.unexpected_keys:
            raise ValueError(
                f"The LayAlign checkpoint does not fit this model: missing {missing}, unexpected "
                f"{sorted(result.unexpected_keys)}."
            )


def base_load_kwargs(config: LayAlignConfig, kwargs: dict) -> tuple[dict, dict]:
    """The `from_pretrained` keyword arguments of the encoder and of the LLM, when a LayAlign-only checkpoint loads
    them from their sources.

    Shared arguments (`dtype`, `device_map`, download options) go to both; `attn_implementation` given as a dict is
    routed by sub-config name, as transformers routes it for a full checkpoint. A base trained quantized is loaded
    quantized again with the `quantization_config` its sub-config recorded; `quantization_config=` given here
    replaces the LLM's (a quantized encoder is rare and its layers differ: pass it in `encoder_kwargs`). Last,
    `encoder_kwargs=` / `llm_kwargs=` replace anything for one base.
    """
    kwargs = dict(kwargs)
    per_base = {"encoder": kwargs.pop("encoder_kwargs", None) or {}, "llm": kwargs.pop("llm_kwargs", None) or {}}
    llm_quantization = kwargs.pop("quantization_config", None)
    implementation = kwargs.pop("attn_implementation", None)
    loads = {"encoder": dict(kwargs), "llm": dict(kwargs)}
    for base, sub_config_name in (("encoder", "encoder_config"), ("llm", "text_config")):
        if isinstance(implementation, dict):
            if sub_config_name in implementation:
                loads[base]["attn_implementation"] = implementation[sub_config_name]
        elif implementation is not None:
            loads[base]["attn_implementation"] = implementation
        if (recorded := getattr(getattr(config, sub_config_name), "quantization_config", None)) is not None:
            loads[base]["quantization_config"] = quantization_config_object(recorded)
    if llm_quantization is not None:
        loads["llm"]["quantization_config"] = llm_quantization
    for base in BASES:
        loads[base].update(per_base[base])
    return loads["encoder"], loads["llm"]


def quantization_config_object(recorded):
    """A quantization config as `from_pretrained` takes it, from the dict that a saved sub-config holds."""
    from transformers.quantizers.auto import AutoQuantizationConfig

    return AutoQuantizationConfig.from_dict(recorded) if isinstance(recorded, dict) else recorded


def hub_kwargs(kwargs: dict) -> dict:
    return {key: kwargs[key] for key in (*SHARED_LOAD_KWARGS, "revision", "subfolder", "trust_remote_code") if key in kwargs}


def layalign_weight_files(path: str | os.PathLike, download: dict) -> list[str]:
    """The safetensors files of the LayAlign-only checkpoint at `path`: `model.safetensors`, or the shards its index
    lists (`save_pretrained(..., max_shard_size=...)`), each checked to be complete."""
    found = {
        name: cached_file(path, name, _raise_exceptions_for_missing_entries=False, **download)
        for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
    }
    if found[SAFE_WEIGHTS_NAME] is not None:
        files = [found[SAFE_WEIGHTS_NAME]]
    elif found[SAFE_WEIGHTS_INDEX_NAME] is not None:
        files = get_checkpoint_shard_files(path, found[SAFE_WEIGHTS_INDEX_NAME], **download)[0]
    else:
        raise OSError(
            f"{os.fspath(path)!r} holds no LayAlign weights: neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}. "
            "A DeepSpeed ZeRO-3 run whose config leaves `stage3_gather_16bit_weights_on_model_save` "
            "(`zero3_save_16bit_model`) off saves only its engine state (`global_step*/`): recover the weights with "
            "the `zero_to_fp32.py` saved beside it, or turn the option on (the shipped deepspeed_zero3.yaml does)."
        )
    for file in files:
        check_safetensors_file(file)
    return files


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raises an `OSError` naming `path` when it is not a complete safetensors file (a truncated copy or download),
    reading only its header."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise OSError(
            f"{os.fspath(path)!r} is not a complete safetensors file ({error}): it may be truncated by an interrupted "
            "copy or download. Copy or download the checkpoint again, or save it again."
        ) from error


def _class_reference(cls: type) -> str:
    """`module_file.ClassName`, the form of an `auto_map` entry."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
