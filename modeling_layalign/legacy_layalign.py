"""Checkpoints of earlier formats, loaded into today's model.

Until 2026-12-05 the gates were one `(1,)` parameter per adapted LLM layer, `gates.layers.<i>.gate`; they are one
vector `gates.weight` now (see `modules_layalign.LayAlignGates`). Every path through `nn.Module.load_state_dict`
(LayAlign-only checkpoints, `Trainer`'s resume, the shipped checkpoints) stacks the old keys with the gates' own
load hook. transformers' loader of full checkpoints does not call that hook: it is told to leave the old keys and the
missing vector alone (`LayAlignPreTrainedModel._keys_to_ignore_on_load_*`), and [`load_gates_of_full_checkpoint`]
reads them from the weight files afterwards.
"""

import json
import os

from safetensors import safe_open
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file


GATES_KEY = "gates.weight"
GATES_KEY_PATTERN = r"^gates\.weight$"
PER_LAYER_GATES_PATTERN = r"^gates\.layers\.\d+\.gate$"


def load_gates_of_full_checkpoint(model: nn.Module, path: str | os.PathLike, download: dict) -> None:
    """Loads the gates of the full checkpoint at `path` into `model` when they are stored per layer; raises a
    `ValueError` when the checkpoint holds no gates at all (transformers would leave them at zero, silently)."""
    if model.gates is None:
        return
    per_layer = [f"gates.layers.{layer}.gate" for layer in model.gates.adapted_layers]
    stored = _stored_tensors(path, [GATES_KEY, *per_layer], download)
    if GATES_KEY in stored:
        return  # today's format: loaded with every other weight
    if sorted(stored) != sorted(per_layer):
        raise ValueError(
            f"The checkpoint at {os.fspath(path)!r} holds no `{GATES_KEY}` and not every per-layer gate of the adapted "
            f"layers {model.gates.adapted_layers} (found {sorted(stored)}): its config does not describe its weights."
        )
    model.gates.load_state_dict({key.removeprefix("gates."): tensor for key, tensor in stored.items()})


def _stored_tensors(path: str | os.PathLike, keys: list[str], download: dict) -> dict:
    """The tensors among `keys` that the checkpoint's safetensors file(s) hold, one file or an index of shards."""
    index = cached_file(path, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False, **download)
    if index is not None:
        with open(index) as file:
            weight_map = json.load(file)["weight_map"]
        files = sorted({weight_map[key] for key in keys if key in weight_map})
    else:
        files = [SAFE_WEIGHTS_NAME]
    tensors = {}
    for name in files:
        with safe_open(cached_file(path, name, **download), framework="pt") as weights:
            tensors.update({key: weights.get_tensor(key) for key in keys if key in weights.keys()})
    return tensors
