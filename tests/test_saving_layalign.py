"""`saving_layalign.py` through `save_pretrained`: what a save refuses, replaces and keeps, and how it recovers from
killed saves."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from modeling_layalign import LayAlignForCausalLM, LayAlignProcessor

from .conftest import set_gates
from .test_modeling_layalign_checkpoints import logits, sample_inputs, trained_model


def hidden_folders(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_a_save_onto_a_file_is_refused_before_anything_moves(tmp_path):
    model = trained_model(tmp_path)
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(NotADirectoryError, match=r"notes.txt' is a file, not a folder"):
        model.save_pretrained(target)
    assert target.read_text() == "keep me" and not hidden_folders(tmp_path)


def test_a_resave_replaces_the_old_processor_and_keeps_the_rest(tmp_path, tiny_base_folders):
    model = LayAlignForCausalLM.from_base_models(tiny_base_folders["encoder"], tiny_base_folders["llm"])
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_folders["llm"])
    tokenizer.chat_template = "{{ 'old template' }}"
    encoder_tokenizer = AutoTokenizer.from_pretrained(tiny_base_folders["encoder"])
    LayAlignProcessor(tokenizer=tokenizer, encoder_tokenizer=encoder_tokenizer, prompt_template="old {query}").save_pretrained(folder)
    (folder / "eval_mgsm.json").write_text("{}")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "config.json").write_text("{}")
    (folder / "checkpoint-5" / "tokenizer_config.json").write_text("{}")
    (folder / "checkpoint-10").mkdir()
    for name in ("adapter_config.json", "tokenizer_config.json", "trainer_state.json"):  # a LoRA run's, peft-saved
        (folder / "checkpoint-10" / name).write_text("{}")
    assert (folder / "chat_template.jinja").is_file() and (folder / "processor_config.json").is_file()

    model.save_pretrained(folder)

    left = sorted(path.name for path in folder.iterdir())
    assert not {"chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json"} & set(left)
    kept_folders = {"checkpoint-5", "checkpoint-10"}
    assert not [name for name in left if (folder / name).is_dir() and name not in kept_folders]  # the encoder tokenizer
    assert (folder / "eval_mgsm.json").is_file()
    assert all((folder / name / "tokenizer_config.json").is_file() for name in kept_folders)
    with pytest.raises((OSError, ValueError)):
        AutoTokenizer.from_pretrained(folder)  # nothing stale to load
    LayAlignForCausalLM.from_pretrained(folder)
    assert not hidden_folders(tmp_path)


def test_folders_get_the_permissions_of_transformers_saves(tmp_path):
    model = trained_model(tmp_path)
    model.save_pretrained(tmp_path / "checkpoint")
    mode = stat.S_IMODE(os.stat(tmp_path / "checkpoint").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "llama").st_mode)  # written by transformers' save_pretrained


def test_no_permission_in_the_parent_names_the_save_directory(tmp_path, monkeypatch):
    """Root ignores permissions, so the refused system call is simulated."""
    model = trained_model(tmp_path)
    real_mkdir = os.mkdir

    def refuse_in_parent(path, *args, **kwargs):
        if Path(path).parent == tmp_path / "parent":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    (tmp_path / "parent").mkdir()
    monkeypatch.setattr("modeling_layalign.saving_layalign.os.mkdir", refuse_in_parent)
    with pytest.raises(PermissionError, match=r"Cannot save to '.*parent/checkpoint': no permission to write in its parent"):
        model.save_pretrained(tmp_path / "parent" / "checkpoint")
    assert not list((tmp_path / "parent").iterdir())


def test_no_permission_on_the_folder_names_it_and_leaves_it_whole(tmp_path, monkeypatch):
    model = trained_model(tmp_path)
    model.save_pretrained(tmp_path / "checkpoint")
    real_replace = os.replace

    def refuse_moving_the_checkpoint(source, destination):
        if Path(source) == tmp_path / "checkpoint":
            raise PermissionError(13, "Permission denied", os.fspath(source))
        return real_replace(source, destination)

    monkeypatch.setattr("modeling_layalign.saving_layalign.os.replace", refuse_moving_the_checkpoint)
    with pytest.raises(PermissionError, match=r"Cannot save to '.*checkpoint': no permission to replace that folder"):
        model.save_pretrained(tmp_path / "checkpoint")
    assert not hidden_folders(tmp_path)
    LayAlignForCausalLM.from_pretrained(tmp_path / "checkpoint")


KILLED_SAVE = textwrap.dedent(
    """
    import os, sys
    from modeling_layalign import LayAlignForCausalLM
    from modeling_layalign import saving_layalign

    model = LayAlignForCausalLM.from_base_models(sys.argv[1], sys.argv[2])
    target, when = sys.argv[3], sys.argv[4]
    real_replace, calls = os.replace, []

    def killed_between_the_renames(source, destination):
        calls.append(source)
        if len(calls) == 2:
            os._exit(9)
        real_replace(source, destination)

    def killed_while_writing(*args, **kwargs):
        os._exit(9)

    if when == "between_renames":
        saving_layalign.os.replace = killed_between_the_renames
    else:
        import transformers.modeling_utils
        transformers.modeling_utils.safe_save_file = killed_while_writing
    model.save_pretrained(target)
    """
)


def kill_a_save(tiny_base_folders, target: Path, when: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, tiny_base_folders["encoder"], tiny_base_folders["llm"], str(target), when],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 9, result.stderr[-2000:]


def test_a_save_killed_between_its_renames_is_found_and_recovered(tmp_path, tiny_base_folders):
    model = LayAlignForCausalLM.from_base_models(tiny_base_folders["encoder"], tiny_base_folders["llm"])
    inputs = sample_inputs()
    target = tmp_path / "checkpoint"
    model.save_pretrained(target)
    (target / "eval_mgsm.json").write_text("{}")
    before = logits(LayAlignForCausalLM.from_pretrained(target), inputs)

    kill_a_save(tiny_base_folders, target, "between_renames")
    assert not target.exists()
    with pytest.raises(OSError, match=r"killed between its two renames, and the previous checkpoint is in '.*\.checkpoint\.old-"):
        LayAlignForCausalLM.from_pretrained(target)

    set_gates(model, 2.0)
    model.save_pretrained(target)  # puts the old one back first, so what it held besides the model is kept
    assert (target / "eval_mgsm.json").is_file() and not hidden_folders(tmp_path)
    after = logits(LayAlignForCausalLM.from_pretrained(target), inputs)
    assert not after.equal(before)


def test_a_save_killed_while_writing_leaves_a_folder_the_next_save_removes(tmp_path, tiny_base_folders):
    target = tmp_path / "checkpoint"
    kill_a_save(tiny_base_folders, target, "while_writing")
    assert [name.startswith(".checkpoint.saving-") for name in hidden_folders(tmp_path)] == [True]
    LayAlignForCausalLM.from_base_models(tiny_base_folders["encoder"], tiny_base_folders["llm"]).save_pretrained(target)
    assert not hidden_folders(tmp_path) and (target / "config.json").is_file()
