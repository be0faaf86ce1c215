"""Checks that a checkpoint's LayAlign weights meet the bases they were trained on.

A LayAlign-only checkpoint names its encoder and LLM and holds a fingerprint of their weights; loading it over another
base (a fine-tuned copy of the same architecture, a moved folder holding something else) would give wrong results
without any error, so `from_pretrained` and a resumed `Trainer` run compare the bases first.
"""

import os
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.utils import CONFIG_NAME, cached_file, logging


logger = logging.get_logger(__name__)


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

    Only plain floating-point weights are sampled (see [`is_comparable_weight`]): in a quantized base these are the
    embeddings and norms, which quantization leaves as they are.

    `state_dict` (keys `prefix` + the base's own names) is the whole model's state dict that a sharding engine
    gathers for saving (FSDP's full state dict, ZeRO-3's consolidated weights): under sharding the base's
    parameters hold only this process's shard, so the values come from the gathered weights, and a weight the
    gathered dict lacks is left out of the fingerprint (loading then skips it) rather than read from a shard.
    """
    names = [name for name, parameter in model.named_parameters() if is_comparable_weight(parameter)]
    fingerprint = {}
    for name in dict.fromkeys(names[index] for index in (0, len(names) // 2, len(names) - 1) if names):
        weight = model.get_parameter(name) if state_dict is None else state_dict.get(prefix + name)
        if weight is not None and is_comparable_weight(weight):
            fingerprint[name] = {
                "numel": weight.numel(),
                "dtype": str(weight.dtype).removeprefix("torch."),
                "values": _sample(weight, values_per_weight),
            }
    return fingerprint


def check_base_fingerprint(model: PreTrainedModel, expected: dict[str, dict], source_field: str) -> None:
    """Raises a `ValueError` naming `source_field` if `model`'s weights differ from the fingerprint saved with the
    checkpoint. Weights it cannot compare (quantized, offloaded, renamed, sharded) are skipped."""
    parameters = dict(model.named_parameters())
    for name, saved in expected.items():
        weight = parameters.get(name)
        if weight is None or not is_comparable_weight(weight) or weight.numel() != saved["numel"]:
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


def is_comparable_weight(weight: torch.Tensor) -> bool:
    """Whether `weight` holds plain floating-point values that a fingerprint can sample: not a quantized weight
    (bitsandbytes' packed `Params4bit` / `Int8Params`, torchao's and quanto's tensor subclasses, which report a
    float dtype but hold other values) and not on the meta device."""
    return weight.dtype.is_floating_point and type(weight.detach()) is torch.Tensor and weight.device.type != "meta"


def _sample(weight: torch.Tensor, count: int) -> list[float]:
    flat = weight.detach().reshape(-1)
    positions = evenly_spaced_positions(flat.numel(), count).to(flat.device)
    return flat[positions].double().tolist()  # exact: JSON keeps every bit of a float32 or half value


def evenly_spaced_positions(numel: int, count: int) -> torch.LongTensor:
    """`count` positions from 0 to `numel - 1`, in integer arithmetic (a float32 `linspace` rounds past the end of
    tensors over 2**24 elements)."""
    count = min(count, numel)
    return torch.arange(count, dtype=torch.long) * (numel - 1) // max(count - 1, 1)


def check_base_source(source: str | None, source_field: str, role: str, download: dict) -> None:
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


def check_base_matches(expected, loaded, source_field: str) -> None:
    for attribute in ("model_type", "hidden_size", "num_hidden_layers"):
        if getattr(expected, attribute) != getattr(loaded, attribute):
            raise ValueError(
                f"The base model loaded from `{source_field}` has {attribute}={getattr(loaded, attribute)!r}, but the "
                f"LayAlign checkpoint was trained on {attribute}={getattr(expected, attribute)!r}."
            )


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
