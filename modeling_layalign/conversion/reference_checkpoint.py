"""Reading checkpoints of the reference LayAlign and MindMerger code, and naming their weights as this package does.

What the reference code saves, and where this module reads it from:

- LayAlign (`davidguzmanr/LayAlign`): `finetune.py` saves the whole `LayAlign` module of `LayAlign.py` with
  `accelerator.save_model(..., max_shard_size="30GB", safe_serialization=False)`: a pickled state dict, sharded
  with `pytorch_model.bin.index.json` above 30 GB, that holds the frozen bases too (`encoder_mt.`: the mT5 encoder
  stack; `model_llm.`: the LLM inside peft's `AdaptionPromptModel`; `llm_embedding_layer.`: the LLM's input
  embedding once more). The trained parts are `mapping.mlp.linear1/linear2` and `mapping.end_boundary` (`MLP` and
  `Mapping` in `LayAlign.py`), `encoder_aligner.projector.fc1/fc2[/fc3]` (`WeightedLinearProjector` in
  `layer_wise_aligner.py`) and one `adaption_gate` per adapted LLM layer, at
  `model_llm.<...>.layers.<i>.self_attn.adaption_gate` (`AdaptedAttention` in
  `peft/src/peft/tuners/layalign_prompt/layer.py`, which also moves the wrapped attention's weights to
  `self_attn.model.`).
- MindMerger (`CONE-MT/MindMerger`): `run_training.py` saves the mapping alone, as
  `torch.save({"model_state_dict": model.mapping.state_dict()}, ..., _use_new_zipfile_serialization=False)`
  (`save_model` in `tools/utils.py`), i.e. `mlp.linear1/linear2` and `end_boundary` without the `mapping.` prefix,
  in the legacy (non-zip) format. It converts to `use_layer_fusion=False`, which is MindMerger.

How the reference layout maps onto this package (`modules_layalign.py`):

- `mapping.mlp.linear1` -> `input_mapping.up`, `mapping.mlp.linear2` -> `input_mapping.down`,
  `mapping.end_boundary` `(1, 1, d_llm)` -> `boundary.embedding` `(d_llm,)`.
- `encoder_aligner.projector.fc1` -> `fusion.layer_mix`, same row order: `EncoderAligner.reshape_past_key_values`
  splits the `2M` outputs into consecutive pairs, row `2m` the keys and `2m + 1` the values of the `m`-th adapted
  layer, as here. `fc2` -> `fusion.projection`, `fc3` (the "MLP" structure) -> `fusion.refine`.
- `adaption_gate` of LLM layer `i` -> entry `m` of `gates.weight`, `i` the `m`-th of `adapted_llm_layers` (the
  layers holding one, in increasing order). The reference pairs fc1's rows with its `language_layers` list in list
  order; every script of the reference lists them in increasing order, which is the order used here.
- `fc1`'s input axis runs over `LayAlign.forward`'s `mt_encoder_outputs.hidden_states[i]` for `i` in the config's
  `encoder_layers` (`0..23` for the 24-layer mT5-xl in `finetune.py` and `run_evaluation.py`: the embedding output
  and the outputs of blocks 0..22, not the final output). That is this package's `fused_encoder_layers`, indexed
  the same way, and its default `0..N-1`. Other selections are not recorded in the checkpoint: pass
  `fused_encoder_layers`.

Reading uses `torch.load(weights_only=True, mmap=True)`, so a 30 GB shard is mapped, not read, and a pickle that
holds anything but tensors and containers is refused before it can run code. The base weights in the checkpoint
are not converted: the output names the bases and loads them from there, and a few of them are compared with the
bases named here first, so a LayAlign trained on one LLM is not put on another of the same shape.
"""

import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers.utils import logging

from ..configuration_layalign import LayAlignConfig
from ..modeling_layalign import LayAlignForCausalLM


logger = logging.get_logger(__name__)

DEFAULT_ENCODER = "google/mt5-xl"
DEFAULT_LLM = "meta-math/MetaMath-7B-V1.0"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
# What a Hub download fetches: the pickled weights and their index, nothing else of a training run.
HUB_ALLOW_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]
HUB_IGNORE_PATTERNS = ["training_args.bin", "optimizer*", "scheduler*", "rng_state*", "scaler*"]
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
NOT_WEIGHTS = re.compile(r"^(training_args|optimizer|scheduler|rng_state|scaler)")

# Reference name (relative to the LayAlign module) -> this package's name.
REFERENCE_TO_LAYALIGN = {
    "mapping.mlp.linear1.weight": "input_mapping.up.weight",
    "mapping.mlp.linear1.bias": "input_mapping.up.bias",
    "mapping.mlp.linear2.weight": "input_mapping.down.weight",
    "mapping.mlp.linear2.bias": "input_mapping.down.bias",
    "mapping.end_boundary": "boundary.embedding",
    "encoder_aligner.projector.fc1.weight": "fusion.layer_mix.weight",
    "encoder_aligner.projector.fc1.bias": "fusion.layer_mix.bias",
    "encoder_aligner.projector.fc2.weight": "fusion.projection.weight",
    "encoder_aligner.projector.fc2.bias": "fusion.projection.bias",
    "encoder_aligner.projector.fc3.weight": "fusion.refine.weight",
    "encoder_aligner.projector.fc3.bias": "fusion.refine.bias",
}
MAPPING_PREFIX = "mapping."
ALIGNER_PREFIX = "encoder_aligner."
GATE_PATTERN = re.compile(r"^model_llm\.(?:.+\.)?layers\.(\d+)\.self_attn\.adaption_gate$")
GATE_NAME = "model_llm.<...>.layers.<i>.self_attn.adaption_gate"
# Frozen base weights of the reference modules: `encoder_mt` (both codes), `model_mt` (MindMerger's whole seq2seq
# model), `model_llm` and `llm_embedding_layer` (both codes).
ENCODER_PREFIXES = ("encoder_mt.", "model_mt.")
LLM_PREFIXES = ("model_llm.", "llm_embedding_layer.")
# Trained adapter weights that may sit under a base prefix but are none of LayAlign's: refused rather than dropped.
FOREIGN_TRAINED = re.compile(r"(^|\.)(adaption_\w+|lora_\w+)(\.|$)")
# Parts of a reference key that the reference's wrappers add around a base weight (peft's `AdaptedAttention`).
WRAPPER_SEGMENTS = ((".self_attn.model.", ".self_attn."),)
BASE_SAMPLE_SIZE = 4096


@dataclass
class ReferenceCheckpoint:
    """A reference state dict sorted by role.

    Attributes:
        layalign: reference name (e.g. `mapping.mlp.linear1.weight`) -> tensor, for the LayAlign parts.
        gates: LLM layer index -> `(reference key, tensor)` of its `adaption_gate`.
        encoder_weights, llm_weights: reference key -> tensor of the frozen bases, kept to compare with the bases.
        unknown: keys that are neither LayAlign weights nor under a base prefix.
        root: the outer prefix found in front of every key (e.g. `module.`).
        bare_mapping: the keys are those of the reference `Mapping` module itself (MindMerger's `save_model`).
    """

    layalign: dict[str, torch.Tensor] = field(default_factory=dict)
    gates: dict[int, tuple[str, torch.Tensor]] = field(default_factory=dict)
    encoder_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    llm_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    root: str = ""
    bare_mapping: bool = False

    @property
    def uses_layer_fusion(self) -> bool:
        """Whether the checkpoint holds any part of the layer-wise fusion (LayAlign rather than MindMerger)."""
        return bool(self.gates) or any(name.startswith(ALIGNER_PREFIX) for name in self.layalign)


# -- reading ------------------------------------------------------------------------------------------------------------


def resolve_weight_files(source: str | os.PathLike) -> list[Path]:
    """The pickled weight files of `source`: a file, a folder, or a Hub id (downloaded with `snapshot_download`).

    A folder gives the shards listed in `pytorch_model.bin.index.json` when it has one, else `pytorch_model.bin`,
    else its only `.bin` / `.pt` / `.pth` / `.safetensors` file that is no training-state file (optimizer, ...).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        path = _download_from_hub(os.fspath(source))
    index = path / WEIGHTS_INDEX_NAME
    if not index.is_file():
        indexes = sorted(path.glob("*.bin.index.json"))
        index = indexes[0] if len(indexes) == 1 else index
    if index.is_file():
        return _shards_of(index)
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    candidates = sorted(
        item for item in path.iterdir()
        if item.is_file() and item.suffix in WEIGHT_SUFFIXES and not NOT_WEIGHTS.match(item.name)
    )  # fmt: skip
    if len(candidates) != 1:
        found = ", ".join(item.name for item in candidates) or "none"
        raise ValueError(
            f"Cannot tell which file of {path} holds the weights (candidates: {found}); pass the file itself."
        )
    return candidates


def _shards_of(index: Path) -> list[Path]:
    """The shard files that a `pytorch_model.bin.index.json` names, all inside its folder."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{index} is not a valid shard index (JSON with a `weight_map`): {error}") from error
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no `weight_map`; it is not a sharded PyTorch checkpoint index.")
    folder = index.parent.resolve()
    shards = [index.parent / name for name in sorted(set(map(str, weight_map.values())))]
    outside = [os.fspath(shard) for shard in shards if not shard.resolve().is_relative_to(folder)]
    if outside:
        raise ValueError(f"{index} names shards outside its folder ({', '.join(outside)}); shards must sit beside it.")
    return shards


def _download_from_hub(repo_id: str) -> Path:
    """Downloads only the pickled weights of a Hub repository (not a training run's optimizer state)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS)
    except Exception as error:  # the hub raises many types (offline, not found, bad id); say what SOURCE was
        raise OSError(
            f"{repo_id!r} is neither a local file or folder nor a Hub repository that can be downloaded: {error}"
        ) from error
    return Path(folder)


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Loads one pickled state dict on the CPU without running code from it, memory-mapped when possible.

    `weights_only=True` refuses any object but tensors and plain containers (a pickle can run arbitrary code);
    `mmap=True` maps the tensors' storage instead of reading it, which the zip format of `torch.save` allows.
    MindMerger's legacy (non-zip) files, a few MB of mapping weights, are read into memory. A
    `{"model_state_dict": {...}}` wrapper (MindMerger's `save_model`) is unwrapped.
    """
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: it is not a checkpoint (an interrupted copy or download?).")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    mmap = zipfile.is_zipfile(path)
    if not mmap:
        logger.info(f"{path} is not a zip file: reading it as torch's legacy (non-zip) format, into memory.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds a pickled object that is not a tensor, which `torch.load(weights_only=True)` refuses "
            f"(loading it would run code from the file). Only state dicts of tensors convert. torch said: {error}"
        ) from error
    except Exception as error:  # on a file that is no checkpoint, torch.load fails with many types (EOF, Key, Index...)
        raise ValueError(
            f"{path} cannot be read as a PyTorch checkpoint (`torch.load` failed: {type(error).__name__}: {error}): it "
            "may be truncated by an interrupted copy or download, or not be a `pytorch_model.bin` at all."
        ) from error
    if isinstance(loaded, dict) and set(loaded) == {"model_state_dict"}:
        loaded = loaded["model_state_dict"]
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict (a mapping of names to tensors).")
    not_tensors = sorted(
        f"{key} ({type(value).__name__})" for key, value in loaded.items() if not isinstance(value, torch.Tensor)
    )
    if not_tensors:
        raise ValueError(f"{path} is not a state dict of tensors: {', '.join(not_tensors[:10])}.")
    return loaded


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A reference checkpoint saved with `safe_serialization=True` (`accelerator.save_model`'s default)."""
    logger.info(f"{path} is a safetensors file.")
    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(
            f"{path} cannot be read as a safetensors file ({error}): it may be truncated by an interrupted copy or "
            "download."
        ) from error


def load_reference_state_dict(source: str | os.PathLike | list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of a reference checkpoint (a file, a folder, a Hub id, or its [`resolve_weight_files`]), shards
    merged, memory-mapped."""
    state_dict: dict[str, torch.Tensor] = {}
    for path in source if isinstance(source, list) else resolve_weight_files(source):
        shard = load_weight_file(path)
        repeated = sorted(set(shard) & set(state_dict))
        if repeated:
            raise ValueError(f"{path} repeats keys of another shard: {repeated[:5]}.")
        state_dict.update(shard)
    return state_dict


# -- sorting the keys ---------------------------------------------------------------------------------------------------


def find_root(keys: list[str]) -> tuple[str, bool]:
    """The outer prefix in front of the LayAlign module's names (`""`, `module.`, ...), found from its own weights.

    Returns `(prefix, bare_mapping)`: `bare_mapping` is True for a MindMerger file whose keys are the `Mapping`
    module's own (`mlp.linear1.weight`, `end_boundary`), with `prefix` in front of them.
    """
    roots = _prefixes_of(keys, REFERENCE_TO_LAYALIGN)
    if not roots:
        bare_names = [name[len(MAPPING_PREFIX) :] for name in REFERENCE_TO_LAYALIGN if name.startswith(MAPPING_PREFIX)]
        roots = _prefixes_of(keys, bare_names)
        if len(roots) == 1:
            return roots.pop(), True
    if len(roots) != 1:
        found = "none" if not roots else ", ".join(repr(root) for root in sorted(roots))
        raise ValueError(
            "The checkpoint holds no LayAlign or MindMerger mapping under one prefix (looked for "
            f"`mapping.mlp.linear1.weight`, `mapping.end_boundary`, `encoder_aligner.projector.fc1.weight`, ...; "
            f"prefixes found: {found}). First keys: {keys[:5]}."
        )
    return roots.pop(), False


def _prefixes_of(keys: list[str], names) -> set[str]:
    """The prefixes `p` (empty or ending in `.`) for which some key is `p + name`."""
    roots = set()
    for key in keys:
        for name in names:
            if key == name or key.endswith("." + name):
                roots.add(key[: len(key) - len(name)])
    return roots


def sort_reference_keys(state_dict: dict[str, torch.Tensor]) -> ReferenceCheckpoint:
    """Sorts a reference state dict into LayAlign weights, gates, base weights and unknown keys."""
    root, bare_mapping = find_root(list(state_dict))
    checkpoint = ReferenceCheckpoint(root=root, bare_mapping=bare_mapping)
    for key, tensor in state_dict.items():
        if not key.startswith(root):
            checkpoint.unknown.append(key)
            continue
        name = key[len(root) :]
        if bare_mapping:
            name = MAPPING_PREFIX + name
        if name in REFERENCE_TO_LAYALIGN:
            checkpoint.layalign[name] = tensor
        elif bare_mapping:
            checkpoint.unknown.append(key)
        elif match := GATE_PATTERN.match(name):
            layer = int(match.group(1))
            if layer in checkpoint.gates:
                raise ValueError(f"Two gates for LLM layer {layer}: `{checkpoint.gates[layer][0]}` and `{key}`.")
            checkpoint.gates[layer] = (key, tensor)
        elif name.startswith(ENCODER_PREFIXES + LLM_PREFIXES) and not FOREIGN_TRAINED.search(name):
            side = checkpoint.encoder_weights if name.startswith(ENCODER_PREFIXES) else checkpoint.llm_weights
            side[name] = tensor
        else:
            checkpoint.unknown.append(key)
    return checkpoint


# -- configuration and renaming -----------------------------------------------------------------------------------------


def layalign_config_kwargs(
    checkpoint: ReferenceCheckpoint, encoder_config, fused_encoder_layers: list[int] | None = None
) -> dict:
    """The `LayAlignConfig` fields that the checkpoint determines.

    `adapted_llm_layers` are the layers holding a gate; `fused_encoder_layers` has one entry per input of `fc1`
    (`0..N-1` when it takes all `N` layers of the encoder, as in the reference scripts; else it must be given);
    `fusion_structure` is "mlp" when `fc3` is present.
    """
    if not checkpoint.uses_layer_fusion:
        return {"use_layer_fusion": False}
    kwargs = {
        "use_layer_fusion": True,
        "adapted_llm_layers": sorted(checkpoint.gates),
        "fusion_structure": "mlp" if any(".fc3." in name for name in checkpoint.layalign) else "linear",
    }
    layer_mix = checkpoint.layalign.get("encoder_aligner.projector.fc1.weight")
    if fused_encoder_layers is not None:
        kwargs["fused_encoder_layers"] = list(fused_encoder_layers)
    elif layer_mix is not None and layer_mix.dim() == 2:
        num_fused, num_layers = layer_mix.shape[1], encoder_config.num_hidden_layers
        if num_fused != num_layers:
            raise ValueError(
                f"`encoder_aligner.projector.fc1.weight` mixes {num_fused} encoder hidden states, but the encoder has "
                f"{num_layers} layers, so which states it read is not recorded in the checkpoint: pass "
                f"`fused_encoder_layers` (the reference config's `encoder_layers`, {num_fused} indices into the "
                "encoder's hidden states, 0 being the embedding output)."
            )
        kwargs["fused_encoder_layers"] = list(range(num_layers))
    return kwargs


def rename_to_layalign(checkpoint: ReferenceCheckpoint) -> dict[str, str]:
    """This package's name -> the reference key (with its outer prefix) of every LayAlign tensor in the checkpoint."""
    names = {REFERENCE_TO_LAYALIGN[name]: _reference_key(checkpoint, name) for name in checkpoint.layalign}
    if checkpoint.gates:
        names["gates.weight"] = ", ".join(key for _, (key, _) in sorted(checkpoint.gates.items()))
    return names


def _reference_key(checkpoint: ReferenceCheckpoint, name: str) -> str:
    """The key under which the checkpoint holds (or would hold) the reference weight `name`."""
    if checkpoint.bare_mapping:
        name = name.removeprefix(MAPPING_PREFIX)
    return checkpoint.root + name


def converted_tensors(checkpoint: ReferenceCheckpoint) -> dict[str, torch.Tensor]:
    """The LayAlign tensors under this package's names; `end_boundary` `(1, 1, d_llm)` becomes `(d_llm,)`."""
    tensors = {REFERENCE_TO_LAYALIGN[name]: tensor for name, tensor in checkpoint.layalign.items()}
    boundary = tensors.get("boundary.embedding")
    if boundary is not None and boundary.dim() == 3 and boundary.shape[:2] == (1, 1):
        tensors["boundary.embedding"] = boundary.reshape(-1)
    if checkpoint.gates:  # one `(1,)` gate per adapted layer there, one vector in the layers' order here
        tensors["gates.weight"] = torch.cat([tensor.reshape(-1) for _, (_, tensor) in sorted(checkpoint.gates.items())])
    return tensors


# -- checks -------------------------------------------------------------------------------------------------------------


def check_layout(
    checkpoint: ReferenceCheckpoint, encoder_config, llm_config, fused_encoder_layers: list[int] | None = None
) -> dict:
    """Returns the `LayAlignConfig` fields of the checkpoint ([`layalign_config_kwargs`]), or raises one
    `ValueError` naming every unknown, missing and mis-shaped key.

    The expected names and shapes come from a `LayAlignForCausalLM` built on the meta device from the two bases'
    configs (no memory, no weights), so they are exactly what `load_layalign_state_dict` will take.
    """
    problems = []
    if checkpoint.unknown:
        problems.append(f"unknown keys (neither LayAlign weights nor under a base prefix): {checkpoint.unknown}")
    # Problems that leave no model to compare shapes with: the adapted layers come from the gates.
    num_llm_layers = llm_config.num_hidden_layers
    outside = sorted(key for layer, (key, _) in checkpoint.gates.items() if layer >= num_llm_layers)
    if outside:
        problems.append(f"gates of layers the LLM ({num_llm_layers} layers) does not have: {outside}")
    if checkpoint.uses_layer_fusion and not checkpoint.gates:
        problems.append(f"missing keys: `{GATE_NAME}` (no adapted layer has a gate)")
    config_kwargs = None
    if not outside and (checkpoint.gates or not checkpoint.uses_layer_fusion):
        try:
            config_kwargs = layalign_config_kwargs(checkpoint, encoder_config, fused_encoder_layers)
            problems += _shape_problems(checkpoint, encoder_config, llm_config, config_kwargs)
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ValueError("The checkpoint does not fit a LayAlign model over these bases:\n- " + "\n- ".join(problems))
    return config_kwargs


def _shape_problems(checkpoint: ReferenceCheckpoint, encoder_config, llm_config, config_kwargs: dict) -> list[str]:
    config = LayAlignConfig(encoder_config=encoder_config, text_config=llm_config, **config_kwargs)
    with torch.device("meta"):
        model = LayAlignForCausalLM(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items() if model.is_layalign_key(key)}
    tensors, reference_keys = converted_tensors(checkpoint), rename_to_layalign(checkpoint)
    layalign_to_reference = {value: key for key, value in REFERENCE_TO_LAYALIGN.items()}
    problems = []
    missing = [_reference_key(checkpoint, layalign_to_reference[name]) for name in expected if name not in tensors]
    if missing:
        problems.append(f"missing keys: {missing}")
    extra = [reference_keys[name] for name in tensors if name not in expected]
    if extra:
        problems.append(f"keys this model has no place for (e.g. `fc3` without the MLP structure): {extra}")
    misshaped = [
        f"`{reference_keys[name]}` has shape {_reference_shape(name, tuple(tensor.shape))}, expected "
        f"{_reference_shape(name, expected[name])}"
        for name, tensor in tensors.items()
        if name in expected and tuple(tensor.shape) != expected[name]
    ]
    if misshaped:
        problems.append("mis-shaped keys: " + "; ".join(misshaped))
    return problems


def _reference_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape in the reference's terms: the boundary is `(1, 1, d_llm)` there."""
    return (1, 1, *shape) if name == "boundary.embedding" and len(shape) == 1 else shape
