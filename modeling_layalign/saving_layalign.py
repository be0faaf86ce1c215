"""Saving into a folder without ever leaving a half-written checkpoint that loads: the new files are written to a
hidden folder next to the target, which then takes the target's place by renaming whole folders.

transformers' `save_pretrained` writes into the target folder file by file, so a save killed midway leaves a folder
that loads a mix of old and new files (or a config without its weights). The reference code has the same exposure.
"""

import fnmatch
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

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
    logging,
)


logger = logging.get_logger(__name__)

# The subfolder of a LayAlign-only checkpoint that holds a LoRA of its LLM kept as a peft adapter (what a LoRA run
# over a quantized LLM saves: merging it would round the update away in the quantized weights). Part of the model:
# a new save removes it, so that a stale adapter is never attached to the new weights.
LORA_SUBFOLDER = "lora"
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
# `transformers.trainer.TRAINER_STATE_NAME`, in every Trainer checkpoint (not imported: the Trainer module is heavy
# for the model's remote code).
TRAINER_STATE_FILE = "trainer_state.json"
# Hidden folders next to `NAME` during a save: `.NAME.saving-...` holds the new files, `.NAME.old-...` the replaced
# checkpoint until the new one is in place. The host and process id tell a killed save's folders from a running one's.
HIDDEN_FOLDER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>saving|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]+$")


def save_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Calls `write(folder)` on a fresh hidden folder next to `target`, then puts that folder in `target`'s place.

    The hidden folders of earlier saves into `target` that were killed are cleaned up first (see
    `recover_interrupted_saves`). If `write` raises, `target` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_saves(target)
    staging = _make_hidden_folder(target, "saving")
    try:
        write(staging)
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
        # A processor's second tokenizer. A Trainer's `checkpoint-*` folder holds a tokenizer too, and a model, a peft
        # adapter (a LoRA run's) or at least its trainer state: it is the run's, not this model's.
        tokenizer = any((item / name).is_file() for name in (TOKENIZER_CONFIG_FILE, PROCESSOR_NAME))
        own_content = any((item / name).is_file() for name in (CONFIG_NAME, ADAPTER_CONFIG_NAME, TRAINER_STATE_FILE))
        return item.name in (CHAT_TEMPLATE_DIR, LORA_SUBFOLDER) or (tokenizer and not own_content)
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
