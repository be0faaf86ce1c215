"""Saving and loading LayAlign checkpoints: the LayAlign-only and full forms, and the folder swap that saves them.

The reference code saves the whole model, frozen bases included, as one pickled `pytorch_model.bin`
(`accelerator.save_model(..., safe_serialization=False)` in `finetune.py`). Here a checkpoint whose bases stay
frozen holds the LayAlign modules only (a few MB of safetensors) and a config naming the two bases, which
`from_pretrained` loads first.
"""

import fnmatch
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_utils import load_state_dict
from transformers.tokenization_utils_base import (
    ADDED_TOKENS_FILE,
    FULL_TOKENIZER_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
)
from transformers.utils import (
    ADAPTER_CONFIG_NAME,
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    CONFIG_NAME,
    FEATURE_EXTRACTOR_NAME,
    GENERATION_CONFIG_NAME,
    LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE,
    PROCESSOR_NAME,
    SAFE_WEIGHTS_NAME,
    cached_file,
    logging,
)

from .legacy_layalign import load_gates_of_full_checkpoint
from .configuration_layalign import CHECKPOINT_FORMATS, LayAlignConfig
from .encoders_layalign import encoder_family
from .pipeline_layalign import custom_pipelines_entry


logger = logging.get_logger(__name__)

# Keyword arguments of `from_pretrained` that locate the LayAlign files themselves.
LAYALIGN_FILE_KWARGS = ("revision", "subfolder", "code_revision", "trust_remote_code", "_from_auto", "adapter_kwargs")
# Keyword arguments of `from_pretrained` that also apply to loading the base models.
SHARED_LOAD_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token")
# What a save replaces in a folder that already holds a checkpoint: every file that transformers loads as part of a
# model or of its processor (config, generation config, weights, peft adapters, processor, tokenizers, chat templates,
# vocabularies), and every subfolder holding a tokenizer or processor (a processor's second tokenizer).
MODEL_FILE_PATTERNS = (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    "model*.safetensors",
    "model*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "adapter_model*",
    ADAPTER_CONFIG_NAME,
    PROCESSOR_NAME,
    FEATURE_EXTRACTOR_NAME,
    TOKENIZER_CONFIG_FILE,
    FULL_TOKENIZER_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    ADDED_TOKENS_FILE,
    CHAT_TEMPLATE_FILE,
    LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE,
    CHAT_TEMPLATE_DIR,
    "tokenizer*",
    "*.model",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
)
# Hidden folders next to `NAME` during a save: `.NAME.saving-...` holds the new files, `.NAME.old-...` the replaced
# checkpoint until the new one is in place. The host and process id tell a killed save's folders from a running one's.
HIDDEN_FOLDER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>saving|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]+$")


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

        The files are written to a hidden folder next to `save_directory` (`.NAME.saving-*`), which then takes the
        old folder's place by renaming whole folders: an interrupted save never leaves a folder that loads a mix of
        old and new files, and never loses the old checkpoint before the new one is complete.

        What a save replaces and what it keeps, when `save_directory` already holds a checkpoint: every file that
        transformers loads as part of a model or its processor is replaced or removed (config, generation config,
        weights, peft adapters, processor, tokenizer, chat-template and vocabulary files, and subfolders holding a
        tokenizer; see `MODEL_FILE_PATTERNS`), so nothing of the old model is loaded beside the new one: save the
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
        checkpoint_format = checkpoint_format or self.default_checkpoint_format()
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"`checkpoint_format` must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}.")
        if checkpoint_format == "layalign_only":
            if not (self.config.encoder_name_or_path and self.config.llm_name_or_path):
                raise ValueError(
                    "A LayAlign-only checkpoint needs `config.encoder_name_or_path` and `config.llm_name_or_path` to "
                    "reload the bases from; set them or save with `checkpoint_format='full'`."
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
        save_directory.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted_saves(save_directory)
        staging = _make_hidden_folder(save_directory, "saving")
        try:
            super().save_pretrained(staging, *args, state_dict=state_dict, **kwargs)
            _swap_in(staging, save_directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, config=None, **kwargs):
        """Loads either checkpoint form, from a folder or the Hub.

        A full checkpoint loads like any transformers model. A LayAlign-only one first loads the encoder and the LLM
        from the sources its config names, or from `encoder_name_or_path=` / `llm_name_or_path=` given here (`dtype`,
        `device_map`, `attn_implementation`, `quantization_config` and the download options apply to them), checks
        that their weights are the ones it was saved with (`check_base_weights=False` skips this), then loads the
        LayAlign weights, and fails if any LayAlign weight is missing or unexpected: plain
        `PreTrainedModel.from_pretrained` would silently give random bases instead.
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
        if config.checkpoint_format != "layalign_only":
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
            download = {key: kwargs[key] for key in ("revision", "subfolder", *SHARED_LOAD_KWARGS) if key in kwargs}
            model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) on request
            load_gates_of_full_checkpoint(model, pretrained_model_name_or_path, download)
            return loaded
        return cls._from_layalign_only(pretrained_model_name_or_path, config, check_base_weights, **kwargs)

    @classmethod
    def _from_layalign_only(
        cls, path: str | os.PathLike, config: LayAlignConfig, check_base_weights: bool, **kwargs
    ) -> PreTrainedModel:
        file_kwargs = {key: kwargs.pop(key) for key in LAYALIGN_FILE_KWARGS if key in kwargs}
        shared = {key: kwargs[key] for key in SHARED_LOAD_KWARGS if key in kwargs}
        download = {**shared, **{key: file_kwargs[key] for key in ("revision", "subfolder") if key in file_kwargs}}
        weights_file = cached_file(path, SAFE_WEIGHTS_NAME, **download)
        check_safetensors_file(weights_file)
        logger.info(
            f"{path} holds the LayAlign weights only: loading the encoder from {config.encoder_name_or_path} and the "
            f"LLM from {config.llm_name_or_path} first."
        )
        for source_field, role in (("encoder_name_or_path", "encoder"), ("llm_name_or_path", "LLM")):
            _check_base_source(getattr(config, source_field), source_field, role, shared)
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
        if check_base_weights and config.base_fingerprints:
            check_base_fingerprint(model.encoder, config.base_fingerprints["encoder"], "encoder_name_or_path")
            check_base_fingerprint(model.llm, config.base_fingerprints["llm"], "llm_name_or_path")
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



def hub_kwargs(kwargs: dict) -> dict:
    return {key: kwargs[key] for key in (*SHARED_LOAD_KWARGS, "revision", "subfolder", "trust_remote_code") if key in kwargs}


def base_model_source(model: PreTrainedModel) -> str | None:
    """Where a loaded base model came from, as an absolute path for local folders; `None` when built from a config."""
    source = model.config._name_or_path
    if not source:
        return None
    return os.path.abspath(source) if os.path.isdir(source) else source


def base_fingerprint(
    model: PreTrainedModel, state_dict: dict | None = None, prefix: str = "", values_per_weight: int = 16
) -> dict[str, dict]:
    """A few values of a base's first, middle and last weights, at evenly spaced positions, with their dtype.

    Cheap, unchanged by loading the base in another dtype (compared up to one rounding step of the coarser dtype),
    and different for a fine-tuned copy of the same architecture, whose weights have moved by more than that.

    `state_dict` (keys `prefix` + the base's own names) is the whole model's state dict that a sharding engine
    gathers for saving (FSDP's full state dict, ZeRO-3's consolidated weights): under sharding the base's
    parameters hold only this process's shard, so the values come from the gathered weights, and a weight the
    gathered dict lacks is left out of the fingerprint (loading then skips it) rather than read from a shard.
    """
    names = [name for name, _ in model.named_parameters()]
    fingerprint = {}
    for name in dict.fromkeys(names[index] for index in (0, len(names) // 2, len(names) - 1)):
        weight = model.get_parameter(name) if state_dict is None else state_dict.get(prefix + name)
        if weight is not None:
            fingerprint[name] = {
                "numel": weight.numel(),
                "dtype": str(weight.dtype).removeprefix("torch."),
                "values": _sample(weight, values_per_weight),
            }
    return fingerprint


def check_base_fingerprint(model: PreTrainedModel, expected: dict[str, dict], source_field: str) -> None:
    """Raises a `ValueError` naming `source_field` if `model`'s weights differ from the fingerprint saved with the
    checkpoint. Weights it cannot compare (quantised, offloaded, renamed) are skipped."""
    parameters = dict(model.named_parameters())
    for name, saved in expected.items():
        weight = parameters.get(name)
        comparable = weight is not None and weight.dtype.is_floating_point and weight.device.type != "meta"
        if not comparable or weight.numel() != saved["numel"]:
            logger.info(f"Cannot compare `{name}` of the base in `{source_field}` with the checkpoint's fingerprint.")
            continue
        values = torch.tensor(_sample(weight, len(saved["values"])), dtype=torch.float64)
        reference = torch.tensor(saved["values"], dtype=torch.float64)
        coarser = max(torch.finfo(weight.dtype).eps, torch.finfo(getattr(torch, saved["dtype"])).eps)
        if not torch.allclose(values, reference, rtol=coarser, atol=1e-3 * coarser * reference.abs().max().item()):
            raise ValueError(
                f"The base loaded from `{source_field}` has other weights than the one this checkpoint was trained "
                f"with (`{name}` differs: {values[:3].tolist()} against {reference[:3].tolist()}); its LayAlign weights "
                f"would give wrong results over it. Pass `{source_field}=` the base it was trained on, or "
                "`check_base_weights=False` if you know better."
            )


def _sample(weight: torch.Tensor, count: int) -> list[float]:
    flat = weight.detach().reshape(-1)
    positions = evenly_spaced_positions(flat.numel(), count).to(flat.device)
    return flat[positions].double().tolist()  # exact: JSON keeps every bit of a float32 or half value


def evenly_spaced_positions(numel: int, count: int) -> torch.LongTensor:
    """`count` positions from 0 to `numel - 1`, in integer arithmetic (a float32 `linspace` rounds past the end of
    tensors over 2**24 elements)."""
    count = min(count, numel)
    return torch.arange(count, dtype=torch.long) * (numel - 1) // max(count - 1, 1)


def _check_base_source(source: str | None, source_field: str, role: str, download: dict) -> None:
    """Checks, before any weight is loaded, that the base named in config.json can be found: a local folder that is
    no longer there (transformers would take the path for a malformed Hub id), no name at all, or a Hub id that is
    not in the cache offline are named with the field to pass instead."""
    hint = f"pass `{source_field}=` to `from_pretrained` with where it is (a folder or a Hub id)."
    if not source:
        raise OSError(f"config.json names no {role} (`{source_field}` is {source!r}): {hint}")
    looks_local = os.path.isabs(source) or source.startswith((".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(source)):
        raise OSError(
            f"The {role} named in config.json ({source!r}, field `{source_field}`) is not found on this machine; {hint}"
        )
    if not looks_local:
        try:
            cached_file(source, CONFIG_NAME, **download)
        except (OSError, ValueError) as error:
            raise OSError(
                f"The {role} named in config.json ({source!r}, field `{source_field}`) cannot be loaded: "
                f"{str(error).strip().splitlines()[0]} Download it first (offline, only cached models load), or {hint}"
            ) from error


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


def check_base_matches(expected, loaded, source_field: str) -> None:
    for attribute in ("model_type", "hidden_size", "num_hidden_layers"):
        if getattr(expected, attribute) != getattr(loaded, attribute):
            raise ValueError(
                f"The base model loaded from `{source_field}` has {attribute}={getattr(loaded, attribute)!r}, but the "
                f"LayAlign checkpoint was trained on {attribute}={getattr(expected, attribute)!r}."
            )


def _class_reference(cls: type) -> str:
    """`module_file.ClassName`, the form of an `auto_map` entry."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def _make_hidden_folder(target: Path, kind: str) -> Path:
    """Creates `.NAME.<kind>-<host>-<pid>-<random>` next to `target`, with the permissions of any new folder (the
    umask's, as transformers' own saves get; `tempfile.mkdtemp` would give 0700)."""
    folder = target.parent / f".{target.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.mkdir(folder)
    except PermissionError as error:
        raise PermissionError(
            f"Cannot save to {os.fspath(target)!r}: no permission to write in its parent folder "
            f"{os.fspath(target.parent)!r} (a save writes the new checkpoint next to the folder, then renames it into "
            "place). Pass a `save_directory` in a folder you can write to."
        ) from error
    return folder


def _swap_in(staging: Path, target: Path) -> None:
    """Puts the finished save in `staging` in place of `target` by renaming whole folders.

    `target` is renamed aside, `staging` renamed in, and only then is the old folder deleted, so a complete
    checkpoint exists at every moment: the old one (at `target`, then aside) until the new one is in place. If the
    second rename fails, the old folder is put back. What the old folder holds besides a model and its processor
    moves into the new one (see `save_pretrained`).
    """
    if not target.exists():
        os.replace(staging, target)
        return
    aside = _make_hidden_folder(target, "old")
    try:
        os.replace(target, aside / target.name)
    except OSError as error:
        aside.rmdir()
        if isinstance(error, PermissionError):
            raise PermissionError(
                f"Cannot save to {os.fspath(target)!r}: no permission to replace that folder (a save renames it aside "
                "and the new checkpoint into its place, which needs write permission on it and on its parent). Pass "
                "a `save_directory` you can write to."
            ) from error
        raise
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside / target.name, target)
        aside.rmdir()
        raise
    _carry_over(aside / target.name, target)
    shutil.rmtree(aside)


def _carry_over(old: Path, new: Path) -> None:
    """Moves what `old` holds besides a model and its processor into `new`, where `new` has nothing of that name."""
    for item in old.iterdir():
        if not describes_a_model(item) and not (new / item.name).exists():
            os.replace(item, new / item.name)


def describes_a_model(item: Path) -> bool:
    """Whether a file or subfolder of a checkpoint is one that a new save replaces (see `MODEL_FILE_PATTERNS`)."""
    if item.is_dir():
        # A processor's second tokenizer; a Trainer's `checkpoint-*` folder holds a tokenizer too, and a model.
        tokenizer = any((item / name).is_file() for name in (TOKENIZER_CONFIG_FILE, PROCESSOR_NAME))
        return item.name == CHAT_TEMPLATE_DIR or (tokenizer and not (item / CONFIG_NAME).is_file())
    return any(fnmatch.fnmatchcase(item.name, pattern) for pattern in MODEL_FILE_PATTERNS)


def _killed_save_folders(target: Path) -> list[tuple[str, Path]]:
    """`(kind, folder)` of the hidden folders that saves into `target` left behind when their process died on this
    host (a folder of a running save, or of another host, is not touched: it is logged)."""
    found = []
    if not target.parent.is_dir():
        return found
    for folder in target.parent.iterdir():
        match = HIDDEN_FOLDER.match(folder.name)
        if match is None or match["name"] != target.name or not folder.is_dir():
            continue
        if match["host"] != socket.gethostname():
            logger.warning(f"{folder} was left by a save into {target} on host {match['host']}; it is not touched.")
        elif not _process_is_running(int(match["pid"])):
            found.append((match["kind"], folder))
    return sorted(found, key=lambda entry: entry[0])  # "old" before "saving"


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def recover_interrupted_saves(target: Path) -> None:
    """Cleans up after saves into `target` that were killed.

    A save killed between its two renames left the previous checkpoint in `.NAME.old-*/NAME` and nothing at
    `target`: it is put back. One killed after them left what the old folder held besides the model there: that
    moves into `target`. The hidden folders of killed saves (`.NAME.saving-*`, up to a checkpoint's size) are removed.
    """
    for kind, folder in _killed_save_folders(target):
        previous = folder / target.name
        if kind == "old" and previous.is_dir():
            if not target.exists():
                os.replace(previous, target)
                logger.warning(f"Put back the checkpoint that a killed save into {target} had left in {folder}.")
            else:
                _carry_over(previous, target)
        shutil.rmtree(folder)


def interrupted_save_location(target: Path) -> Path | None:
    """Where a save into `target` killed between its two renames left the previous checkpoint, if it did."""
    for kind, folder in _killed_save_folders(target):
        if kind == "old" and (folder / target.name / CONFIG_NAME).is_file():
            return folder / target.name
    return None


# `LayAlignConfig` fields that decide which LayAlign weights a model has, hence its optimizer's parameter groups.
STRUCTURE_FIELDS = (
    "use_input_mapping",
    "use_layer_fusion",
    "fused_encoder_layers",
    "adapted_llm_layers",
    "fusion_structure",
    "train_encoder",
    "train_llm",
)


def check_training_checkpoint(model: PreTrainedModel, checkpoint: str | os.PathLike) -> None:
    """Raises a `ValueError` unless `checkpoint` is a `Trainer` checkpoint that `model` can resume from.

    `Trainer` loads a LayAlign-only checkpoint over whatever bases the run has and only warns about the missing base
    weights, as it does for a correct resume: a checkpoint trained over another base, or with other LayAlign modules
    (a MindMerger run resumed as LayAlign), is refused here the way `from_pretrained` refuses it.
    """
    from transformers.trainer import TRAINER_STATE_NAME

    folder = Path(checkpoint)
    if not (folder / TRAINER_STATE_NAME).is_file():
        raise ValueError(
            f"`resume_from_checkpoint` {os.fspath(folder)!r} is not a training checkpoint: it holds no "
            f"{TRAINER_STATE_NAME}. Pass a `checkpoint-N` folder that Trainer wrote; to start from a saved model "
            "instead, pass it as `--init_from`."
        )
    if not (folder / CONFIG_NAME).is_file():
        return  # a peft checkpoint of a LoRA run: its adapter config names the model
    saved = type(model.config).from_pretrained(folder)
    differences = [
        f"{name}={getattr(saved, name)!r} (this run: {getattr(model.config, name)!r})"
        for name in STRUCTURE_FIELDS
        if getattr(saved, name) != getattr(model.config, name)
    ]
    if differences:
        raise ValueError(
            f"`resume_from_checkpoint` {os.fspath(folder)!r} was trained with other LayAlign modules: "
            f"{', '.join(differences)}. Resume with the settings it was trained with, or start from it with `--init_from`."
        )
    try:
        check_base_matches(saved.encoder_config, model.encoder.config, "encoder_name_or_path")
        check_base_matches(saved.text_config, model.llm.config, "llm_name_or_path")
        if saved.base_fingerprints:
            check_base_fingerprint(model.encoder, saved.base_fingerprints["encoder"], "encoder_name_or_path")
            check_base_fingerprint(model.llm, saved.base_fingerprints["llm"], "llm_name_or_path")
    except ValueError as error:
        raise ValueError(
            f"`resume_from_checkpoint` {os.fspath(folder)!r} was trained over other bases than this run's (encoder "
            f"{saved.encoder_name_or_path!r}, LLM {saved.llm_name_or_path!r}): {error}"
        ) from error
