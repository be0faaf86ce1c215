"""The bases of a LayAlign-only checkpoint in vLLM: found, checked against the checkpoint, and read.

A LayAlign-only checkpoint (`checkpoint_format: "layalign_only"` in config.json: what `save_pretrained` writes by
default for a model built from named bases, e.g. the shipped `checkpoints/demo-stage*`) holds the LayAlign modules
only. Its config names the encoder and the LLM (`encoder_name_or_path`, `llm_name_or_path`) and, since 2026-11, holds
a fingerprint of their weights (`base_fingerprints`: a few values of three weights per base). vLLM's loader reads the
checkpoint folder; the model then reads the bases from the folders (or cached Hub ids) named there, or from the ones
given at serving time through vLLM's config overrides:

    LLM(model=<checkpoint>, hf_overrides={"encoder_name_or_path": <folder>, "llm_name_or_path": <folder>})
    python -m vllm.entrypoints.openai.api_server --model <checkpoint> --hf-overrides '{"llm_name_or_path": ...}'

A base that is missing, of another architecture or size than the checkpoint recorded, or with other weights than its
fingerprint (a fine-tuned copy, a moved folder holding something else) is refused with an error naming the field to
override, as `LayAlignForCausalLM.from_pretrained` refuses it. The checks mirror `modeling_layalign/bases_layalign.py`
(`check_base_source`, `check_base_matches`, `check_base_fingerprint`), which cannot be imported under the
transformers that vLLM brings.
"""

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

from vllm.logger import init_logger

from .families import ENCODER_FAMILIES


logger = init_logger(__name__)

LAYALIGN_ONLY = "layalign_only"
# base -> (config field naming its source, sub-config field, role in messages)
BASES = {
    "encoder": ("encoder_name_or_path", "encoder_config", "encoder"),
    "llm": ("llm_name_or_path", "text_config", "LLM"),
}


def override_hint(source_field: str) -> str:
    """How to tell vLLM where a base is."""
    return (
        f"Pass where it is (a folder or a Hub id) with `hf_overrides={{'{source_field}': ...}}` in `LLM(...)`, or "
        f"`--hf-overrides '{{\"{source_field}\": \"...\"}}'` on the server."
    )


def check_bases(config: PretrainedConfig) -> None:
    """Raises before any weight is read when a base of a LayAlign-only checkpoint cannot be found (no name, a local
    folder that is not there, a Hub id that is not cached offline) or is of another family or size than the one the
    checkpoint was trained on (`model_type`, `hidden_size`, `num_hidden_layers` of its sub-config)."""
    for base, (source_field, sub_config_field, role) in BASES.items():
        source = getattr(config, source_field)
        check_base_source(source, source_field, role)
        loaded = AutoConfig.from_pretrained(source)
        expected = getattr(config, sub_config_field)
        for attribute in ("model_type", "hidden_size", "num_hidden_layers"):
            if getattr(expected, attribute) != getattr(loaded, attribute):
                raise ValueError(
                    f"The {role} in `{source_field}` ({source!r}) has {attribute}={getattr(loaded, attribute)!r}, but "
                    f"the LayAlign checkpoint was trained on {attribute}={getattr(expected, attribute)!r}. "
                    f"{override_hint(source_field)}"
                )


def check_base_source(source: str | None, source_field: str, role: str) -> None:
    """Raises an `OSError` naming `source_field` unless `source` is a local folder or a loadable Hub id."""
    if not source:
        raise OSError(
            f"The LayAlign-only checkpoint names no {role} (`{source_field}` is {source!r}). "
            f"{override_hint(source_field)}"
        )
    looks_local = os.path.isabs(source) or source.startswith((".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(source)):
        raise OSError(
            f"The {role} of this LayAlign-only checkpoint ({source!r}, field `{source_field}`) is not found on this "
            f"machine. {override_hint(source_field)}"
        )
    if not looks_local:
        try:
            cached_file(source, CONFIG_NAME)
        except (OSError, ValueError) as error:
            raise OSError(
                f"The {role} of this LayAlign-only checkpoint ({source!r}, field `{source_field}`) cannot be loaded: "
                f"{str(error).strip().splitlines()[0]} Download it first (offline, only cached models load). "
                f"{override_hint(source_field)}"
            ) from error


def load_encoder_weights(config: PretrainedConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict of the encoder named in `config.encoder_name_or_path`, in `dtype`, checked against the
    checkpoint's fingerprint.

    Loaded by transformers' `from_pretrained` with the family's class (`families.EncoderFamily`), which takes the
    encoder out of a whole model (mT5's decoder and BERT's pooler and heads are not read) and renames legacy keys, so
    the names are those of the module the full checkpoints hold under `encoder.*`.
    """
    family = ENCODER_FAMILIES[config.encoder_config.model_type]
    encoder = family.from_pretrained(config.encoder_name_or_path, dtype=dtype)
    check_fingerprint(dict(encoder.named_parameters()), fingerprint_of(config, "encoder"), "encoder_name_or_path")
    return encoder.state_dict()


def llm_weights(config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` of every weight in the safetensors files of the LLM named in `config.llm_name_or_path`,
    under the names transformers saved them with (what vLLM's causal-LM `load_weights` takes). The fingerprinted
    weights are checked as they pass, before vLLM reads them."""
    expected = fingerprint_of(config, "llm")
    seen = set()
    for file in _safetensors_files(config.llm_name_or_path):
        with safe_open(file, framework="pt") as weights:
            for name in weights.keys():
                tensor = weights.get_tensor(name)
                if name in expected:
                    check_fingerprint({name: tensor}, {name: expected[name]}, "llm_name_or_path")
                    seen.add(name)
                yield name, tensor
    for name in sorted(set(expected) - seen):
        logger.info("Cannot compare `%s` of the LLM in `llm_name_or_path` with the checkpoint's fingerprint.", name)


def fingerprint_of(config: PretrainedConfig, base: str) -> dict[str, dict]:
    """The fingerprint saved for `base` (`{weight name: {"numel", "dtype", "values"}}`), empty when the checkpoint
    has none (saved before fingerprints were recorded)."""
    return (getattr(config, "base_fingerprints", None) or {}).get(base) or {}


def check_fingerprint(weights: Mapping[str, torch.Tensor], expected: dict[str, dict], source_field: str) -> None:
    """Raises a `ValueError` naming `source_field` if a fingerprinted weight differs from its saved values by more
    than one rounding step of the coarser of the two dtypes (`bases_layalign.check_base_fingerprint`). Weights it
    cannot compare (absent under that name, other size, not floating point) are skipped."""
    for name, saved in expected.items():
        weight = weights.get(name)
        if weight is None or not weight.dtype.is_floating_point or weight.numel() != saved["numel"]:
            logger.info("Cannot compare `%s` of the base in `%s` with its fingerprint.", name, source_field)
            continue
        flat = weight.detach().reshape(-1)
        count = min(len(saved["values"]), flat.numel())
        positions = torch.arange(count, dtype=torch.long) * (flat.numel() - 1) // max(count - 1, 1)
        values = flat[positions].double()
        reference = torch.tensor(saved["values"], dtype=torch.float64)
        coarser = max(torch.finfo(weight.dtype).eps, torch.finfo(getattr(torch, saved["dtype"])).eps)
        if not torch.allclose(values, reference, rtol=coarser, atol=1e-3 * coarser * reference.abs().max().item()):
            raise ValueError(
                f"The base in `{source_field}` has other weights than the one this LayAlign checkpoint was trained "
                f"with (`{name}` differs: {values[:3].tolist()} against {reference[:3].tolist()}); its LayAlign "
                f"weights would give wrong results over it. {override_hint(source_field)}"
            )


def _safetensors_files(source: str) -> list[str]:
    """The safetensors files of a model: `model.safetensors`, or the shards its index lists."""
    index = cached_file(source, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False)
    if index is not None:
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        return [cached_file(source, shard) for shard in shards]
    single = cached_file(source, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False)
    if single is None:
        raise OSError(
            f"The LLM in `llm_name_or_path` ({source!r}) holds no {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}; "
            "the LayAlign vLLM plugin reads safetensors only (save the LLM with `save_pretrained`)."
        )
    return [single]
