"""Saving and loading `LayAlignForCausalLM`: both checkpoint forms, remote code, the Hub, interrupted saves."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    M2M100ForConditionalGeneration,
    MT5ForConditionalGeneration,
    XLMRobertaModel,
)

from modeling_layalign import LayAlignForCausalLM
from modeling_layalign.bases_layalign import evenly_spaced_positions

from .conftest import (
    ENCODER_CONFIGS,
    ENCODER_VOCAB,
    LLM_CONFIGS,
    LLM_PAD,
    LLM_VOCAB,
    pad,
    random_ids,
    set_gates,
    tiny_model,
    with_trained_layalign_weights,
)


ENCODER_CHECKPOINT_CLASSES = {
    "mt5": MT5ForConditionalGeneration,
    "m2m_100": M2M100ForConditionalGeneration,
    "xlm-roberta": XLMRobertaModel,
    "qwen2": AutoModelForCausalLM,
}


def save_base(tmp_path: Path, kind: str, name: str, seed: int = 0) -> str:
    """Saves a tiny random base model the way it is published (mT5 and NLLB as full seq2seq models)."""
    torch.manual_seed(seed)
    folder = tmp_path / name
    if kind == "llm":
        model = AutoModelForCausalLM.from_config(LLM_CONFIGS[name]())
    else:
        model_class = ENCODER_CHECKPOINT_CLASSES[name]
        config = ENCODER_CONFIGS[name]()
        model = model_class.from_config(config) if model_class is AutoModelForCausalLM else model_class(config)
    model.save_pretrained(folder)
    return str(folder)


def trained_model(tmp_path: Path, encoder: str = "mt5", llm: str = "llama") -> LayAlignForCausalLM:
    """A model built from two saved bases whose LayAlign weights are no longer at their initial values."""
    model = LayAlignForCausalLM.from_base_models(save_base(tmp_path, "encoder", encoder), save_base(tmp_path, "llm", llm))
    return with_trained_layalign_weights(model)


def sample_inputs(pad_id: int = 0) -> dict:
    generator = torch.Generator().manual_seed(5)
    encoder_input_ids, encoder_attention_mask = pad(random_ids((6, 4), ENCODER_VOCAB, generator), pad_id)
    input_ids, attention_mask = pad(random_ids((3, 5), LLM_VOCAB, generator), LLM_PAD, "left")
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_input_ids=encoder_input_ids,
        encoder_attention_mask=encoder_attention_mask,
    )


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def drop_weight(folder: Path, key: str) -> None:
    """Removes one tensor from the checkpoint's `model.safetensors`, as a damaged or mismatched file would lack it."""
    weights = load_file(folder / "model.safetensors")
    del weights[key]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def weight_names(folder: Path) -> list[str]:
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize("encoder,llm", [("mt5", "llama"), ("m2m_100", "qwen3"), ("xlm-roberta", "gemma3_text"), ("qwen2", "mistral")])
def test_layalign_only_checkpoint_round_trip(tmp_path, encoder, llm):
    model = trained_model(tmp_path, encoder, llm)
    inputs = sample_inputs(model.config.encoder_config.pad_token_id or 0)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "layalign")

    saved = tmp_path / "layalign"
    assert {"config.json", "generation_config.json", "model.safetensors", "modeling_layalign.py", "configuration_layalign.py"} <= {
        path.name for path in saved.iterdir()
    }
    names = weight_names(saved)
    assert names and all(model.is_layalign_key(name) for name in names)
    assert len(names) == len([key for key in model.state_dict() if model.is_layalign_key(key)])
    config = json.loads((saved / "config.json").read_text())
    assert config["checkpoint_format"] == "layalign_only"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_layalign.LayAlignConfig",
        "AutoModel": "modeling_layalign.LayAlignForCausalLM",
        "AutoModelForCausalLM": "modeling_layalign.LayAlignForCausalLM",
    }
    for loader in (LayAlignForCausalLM, AutoModelForCausalLM):
        reloaded = loader.from_pretrained(saved)
        assert type(reloaded) is LayAlignForCausalLM
        assert not reloaded.training
        assert reloaded.name_or_path == reloaded.config.name_or_path == str(saved)  # as transformers records it
        assert (logits(reloaded, inputs) - expected).abs().max().item() == 0.0


def test_full_checkpoint_round_trip(tmp_path):
    model = trained_model(tmp_path, "mt5", "qwen2")
    inputs = sample_inputs()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "full", checkpoint_format="full")
    names = weight_names(tmp_path / "full")
    assert any(name.startswith("llm.") for name in names) and any(name.startswith("encoder.") for name in names)
    assert json.loads((tmp_path / "full" / "config.json").read_text())["checkpoint_format"] == "full"
    # The bases' own folders are not needed any more.
    for base in ("mt5", "qwen2"):
        for file in (tmp_path / base).iterdir():
            file.unlink()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert reloaded.name_or_path == str(tmp_path / "full")
    assert (logits(reloaded, inputs) - expected).abs().max().item() == 0.0


def test_model_built_from_configs_saves_in_full(tmp_path):
    model = tiny_model(llm="gemma2")
    set_gates(model, 0.3)
    assert model.default_checkpoint_format() == "full"
    with pytest.raises(ValueError, match="encoder_name_or_path"):
        model.save_pretrained(tmp_path / "nope", checkpoint_format="layalign_only")
    inputs = sample_inputs()
    model.save_pretrained(tmp_path / "full")
    reloaded = LayAlignForCausalLM.from_pretrained(tmp_path / "full")
    assert (logits(reloaded, inputs) - logits(model, inputs)).abs().max().item() == 0.0
    assert reloaded.gates.weight.tolist() == pytest.approx([0.3] * len(reloaded.config.adapted_llm_layers))
    LayAlignForCausalLM.from_pretrained(tmp_path / "full", check_base_weights=False)  # accepted in either form


def test_tied_llm_embeddings_survive_a_full_round_trip(tmp_path):
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(LLM_CONFIGS["llama"]().__class__(**{**LLM_CONFIGS["llama"]().to_dict(), "tie_word_embeddings": True}))
    encoder_folder = save_base(tmp_path, "encoder", "mt5")
    model = LayAlignForCausalLM.from_base_models(encoder_folder, llm)
    assert model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight
    inputs = sample_inputs()
    model.save_pretrained(tmp_path / "full")
    reloaded = LayAlignForCausalLM.from_pretrained(tmp_path / "full")
    assert reloaded.llm.get_output_embeddings().weight is reloaded.llm.get_input_embeddings().weight
    assert (logits(reloaded, inputs) - logits(model, inputs)).abs().max().item() == 0.0


def test_trainer_style_save_with_a_state_dict_is_filtered(tmp_path):
    model = trained_model(tmp_path)
    model.save_pretrained(tmp_path / "checkpoint-1", state_dict=model.state_dict())
    assert all(model.is_layalign_key(name) for name in weight_names(tmp_path / "checkpoint-1"))


def test_loaded_bases_keep_the_requested_dtype(tmp_path):
    model = LayAlignForCausalLM.from_base_models(
        save_base(tmp_path, "encoder", "mt5"),
        save_base(tmp_path, "llm", "llama"),
        encoder_kwargs={"dtype": torch.bfloat16},
        llm_kwargs={"dtype": torch.bfloat16},
    )
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    model.save_pretrained(tmp_path / "bf16")
    reloaded = LayAlignForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert reloaded.fusion.projection.weight.dtype == torch.bfloat16
    torch.testing.assert_close(reloaded.fusion.projection.weight, model.fusion.projection.weight, atol=0, rtol=0)


@pytest.mark.parametrize("checkpoint_format", ["layalign_only", "full"])
def test_attention_implementation_is_routed_to_each_base(tmp_path, checkpoint_format):
    model = trained_model(tmp_path)
    inputs = sample_inputs()
    model.save_pretrained(tmp_path / "saved", checkpoint_format=checkpoint_format)
    reloaded = LayAlignForCausalLM.from_pretrained(
        tmp_path / "saved", attn_implementation={"encoder_config": "eager", "text_config": "eager"}
    )
    assert reloaded.encoder.config._attn_implementation == "eager"
    assert reloaded.llm.config._attn_implementation == "layalign_eager"
    real = torch.cat([torch.ones(2, 1), inputs["encoder_attention_mask"], torch.ones(2, 1), inputs["attention_mask"]], 1).bool()
    torch.testing.assert_close(logits(reloaded, inputs)[real], logits(model, inputs)[real], atol=1e-5, rtol=0)


def test_a_checkpoint_missing_a_layalign_weight_fails_loudly(tmp_path):
    model = trained_model(tmp_path)
    model.save_pretrained(tmp_path / "layalign")
    drop_weight(tmp_path / "layalign", "boundary.embedding")
    with pytest.raises(ValueError, match="missing \\['boundary.embedding'\\]"):
        LayAlignForCausalLM.from_pretrained(tmp_path / "layalign")


def test_a_changed_base_model_fails_loudly(tmp_path):
    model = trained_model(tmp_path)
    model.save_pretrained(tmp_path / "layalign")
    wider = LLM_CONFIGS["llama"]()
    wider.hidden_size, wider.intermediate_size = 64, 128
    AutoModelForCausalLM.from_config(wider).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="llm_name_or_path.*hidden_size=64"):
        LayAlignForCausalLM.from_pretrained(tmp_path / "layalign")


def test_a_base_with_other_weights_of_the_same_shape_is_refused(tmp_path):
    model = trained_model(tmp_path)
    model.save_pretrained(tmp_path / "layalign")
    save_base(tmp_path, "llm", "llama", seed=11)  # the same architecture, other weights: MetaMath-7B to Llama-2-7B
    with pytest.raises(ValueError, match="base loaded from `llm_name_or_path` has other weights"):
        LayAlignForCausalLM.from_pretrained(tmp_path / "layalign")
    LayAlignForCausalLM.from_pretrained(tmp_path / "layalign", check_base_weights=False)


def test_fingerprint_positions_stay_inside_large_weights():
    """Past 2**24 elements a float32 `linspace` rounds its last position beyond the end of the tensor."""
    numel = 96_014_208  # SmolLM2-135M's embedding: the size that showed it
    positions = evenly_spaced_positions(numel, 16)
    assert positions[0] == 0 and positions[-1] == numel - 1 and (positions.diff() > 0).all()


def test_the_right_bases_in_another_dtype_pass_the_fingerprint_check(tmp_path):
    model = trained_model(tmp_path)
    model.save_pretrained(tmp_path / "layalign")
    assert set(model.config.base_fingerprints) == {"encoder", "llm"}
    reloaded = LayAlignForCausalLM.from_pretrained(tmp_path / "layalign", dtype=torch.bfloat16)
    assert reloaded.llm.dtype == torch.bfloat16


def test_a_save_from_gathered_weights_fingerprints_the_bases_from_them(tmp_path):
    """Under FSDP or ZeRO-3 the bases' own parameters are shards; `Trainer` passes the gathered weights as
    `state_dict`, and the fingerprint must come from those (tests/test_scaling.py runs the engines themselves)."""
    model = trained_model(tmp_path)
    model.save_pretrained(tmp_path / "from_parameters")
    from_parameters = model.config.base_fingerprints
    gathered = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.llm.parameters():
            parameter.zero_()  # what this process would read from its shards
    model.save_pretrained(tmp_path / "from_gathered", state_dict=gathered)
    assert model.config.base_fingerprints == from_parameters
    LayAlignForCausalLM.from_pretrained(tmp_path / "from_gathered")  # the fingerprint check passes

    layalign_only = {key: value for key, value in gathered.items() if model.is_layalign_key(key)}
    model.save_pretrained(tmp_path / "without_bases", state_dict=layalign_only)
    assert model.config.base_fingerprints == {"encoder": {}, "llm": {}}
    LayAlignForCausalLM.from_pretrained(tmp_path / "without_bases")


def test_bases_moved_after_a_layalign_only_save_load_from_where_they_are_now(tmp_path):
    model = trained_model(tmp_path / "then")
    inputs = sample_inputs()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "layalign")
    os.rename(tmp_path / "then", tmp_path / "now")
    with pytest.raises(OSError, match=r"The encoder named in config.json .* pass `encoder_name_or_path=`"):
        LayAlignForCausalLM.from_pretrained(tmp_path / "layalign")
    reloaded = LayAlignForCausalLM.from_pretrained(
        tmp_path / "layalign", encoder_name_or_path=tmp_path / "now" / "mt5", llm_name_or_path=tmp_path / "now" / "llama"
    )
    assert (logits(reloaded, inputs) - expected).abs().max().item() == 0.0
    assert reloaded.config.llm_name_or_path == str(tmp_path / "now" / "llama")


def _failing_save(*args, **kwargs):
    raise OSError("disk full")


def test_an_interrupted_save_never_leaves_a_loadable_half_checkpoint(tmp_path, monkeypatch):
    model = trained_model(tmp_path)
    inputs = sample_inputs()
    model.save_pretrained(tmp_path / "checkpoint")
    before = logits(LayAlignForCausalLM.from_pretrained(tmp_path / "checkpoint"), inputs)

    set_gates(model, 5.0)
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", _failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "checkpoint")
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "fresh")

    after = logits(LayAlignForCausalLM.from_pretrained(tmp_path / "checkpoint"), inputs)
    assert torch.equal(before, after)
    assert not (tmp_path / "fresh" / "config.json").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize("encoder", ["mt5", "xlm-roberta"])
def test_loading_an_encoder_from_its_full_checkpoint_reports_no_expected_leftovers(tmp_path, encoder, capfd):
    """mT5's decoder and XLM-R's pretraining head are in their checkpoints but never built: no load report for them."""
    encoder_folder, llm_folder = save_base(tmp_path, "encoder", encoder), save_base(tmp_path, "llm", "llama")
    capfd.readouterr()
    model = LayAlignForCausalLM.from_base_models(encoder_folder, llm_folder)
    assert "LOAD REPORT" not in capfd.readouterr().err
    assert type(model.encoder)._keys_to_ignore_on_load_unexpected != list(model.encoder_family.unused_checkpoint_keys)


def test_a_folder_without_config_is_not_taken_for_a_checkpoint(tmp_path):
    model = trained_model(tmp_path)
    model.save_pretrained(tmp_path / "checkpoint")
    (tmp_path / "checkpoint" / "config.json").unlink()  # what a crash between the file moves would leave
    with pytest.raises(OSError, match="is not a LayAlign checkpoint: it holds no config.json"):
        LayAlignForCausalLM.from_pretrained(tmp_path / "checkpoint")


def test_a_save_leaves_no_stale_adapter_behind(tmp_path):
    model = trained_model(tmp_path)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # an earlier LoRA run's output
        (folder / name).write_text("{}")
    model.save_pretrained(folder)
    assert not list(folder.glob("adapter_*"))
    LayAlignForCausalLM.from_pretrained(folder)
    (folder / "adapter_config.json").write_text("{}")  # copied in later: loading refuses rather than attach it
    with pytest.raises(OSError, match="holds peft adapter files \\(adapter_config.json\\)"):
        LayAlignForCausalLM.from_pretrained(folder)


def test_a_failure_between_the_folder_renames_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    model = trained_model(tmp_path)
    inputs = sample_inputs()
    model.save_pretrained(tmp_path / "checkpoint")
    before = logits(LayAlignForCausalLM.from_pretrained(tmp_path / "checkpoint"), inputs)
    renames = []

    def crash_on_the_second_rename(source, destination):
        renames.append((source, destination))
        if len(renames) == 2:  # the old folder is aside, the new one not yet in
            raise OSError("power cut")
        os.rename(source, destination)

    monkeypatch.setattr("modeling_layalign.saving_layalign.os.replace", crash_on_the_second_rename)
    set_gates(model, 5.0)
    with pytest.raises(OSError, match="power cut"):
        model.save_pretrained(tmp_path / "checkpoint")
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]
    assert torch.equal(logits(LayAlignForCausalLM.from_pretrained(tmp_path / "checkpoint"), inputs), before)


def test_a_save_keeps_what_else_the_folder_held(tmp_path):
    model = trained_model(tmp_path)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    (folder / "eval_mgsm.json").write_text("{}")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "trainer_state.json").write_text("{}")
    model.save_pretrained(folder)
    assert (folder / "eval_mgsm.json").is_file() and (folder / "checkpoint-5" / "trainer_state.json").is_file()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_resaving_over_a_full_checkpoint_removes_its_old_weights(tmp_path):
    model = trained_model(tmp_path)
    model.save_pretrained(tmp_path / "checkpoint", checkpoint_format="full", max_shard_size="20KB")
    assert (tmp_path / "checkpoint" / "model.safetensors.index.json").exists()
    model.save_pretrained(tmp_path / "checkpoint")
    assert sorted(path.name for path in (tmp_path / "checkpoint").iterdir() if "safetensors" in path.name) == [
        "model.safetensors"
    ]
    LayAlignForCausalLM.from_pretrained(tmp_path / "checkpoint")


REMOTE_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["modeling_layalign"] = None  # the package is not importable in this process
    import torch
    from transformers import AutoModelForCausalLM

    inputs = torch.load(sys.argv[2], weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        torch.save(model(**inputs).logits, sys.argv[3])
    """
)


@pytest.mark.parametrize("checkpoint_format", ["layalign_only", "full"])
def test_remote_code_loads_without_the_package(tmp_path, checkpoint_format):
    model = trained_model(tmp_path)
    inputs = sample_inputs()
    model.save_pretrained(tmp_path / "saved", checkpoint_format=checkpoint_format)
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "load.py").write_text(REMOTE_LOAD_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [sys.executable, "load.py", str(tmp_path / "saved"), "inputs.pt", "logits.pt"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    remote = torch.load(tmp_path / "logits.pt", weights_only=True)
    # Same weights and code in another process: equal up to the last bits, which the CPU's matrix kernels may round
    # differently from one process to another under load (4e-8 seen on an AVX2 machine); a weight that did not load
    # moves the logits by orders of magnitude more.
    torch.testing.assert_close(remote, logits(model, inputs), rtol=0, atol=1e-6)


class FakeHub:
    """Stands in for the Hub API that `push_to_hub` calls: keeps the committed files in memory."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.repos: list[str] = []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            self.files[operation.path_in_repo] = Path(operation.path_or_fileobj).read_bytes()

    def download_to(self, folder: Path) -> Path:
        folder.mkdir()
        for name, content in self.files.items():
            (folder / name).write_bytes(content)
        return folder


def test_push_to_hub_uploads_a_loadable_checkpoint(tmp_path, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr("transformers.utils.hub.hf_api", lambda: hub)
    model = trained_model(tmp_path)
    model.push_to_hub("someone/layalign-tiny")
    assert hub.repos == ["someone/layalign-tiny"]
    assert {"config.json", "model.safetensors", "modeling_layalign.py", "configuration_layalign.py"} <= set(hub.files)
    reloaded = AutoModelForCausalLM.from_pretrained(hub.download_to(tmp_path / "hub"), trust_remote_code=True)
    inputs = sample_inputs()
    assert (logits(reloaded, inputs) - logits(model, inputs)).abs().max().item() == 0.0


def test_resized_embeddings_train_frozen_and_save_with_every_weight(tmp_path):
    model = trained_model(tmp_path)
    source = model.config.llm_name_or_path
    model.resize_token_embeddings(LLM_VOCAB)  # the size it has: nothing changes
    assert model.config.modified_bases == [] and model.default_checkpoint_format() == "layalign_only"
    model.resize_token_embeddings(LLM_VOCAB + 8)  # new tokens in the LLM's tokenizer
    # The LLM no longer equals its source, which stays named as where it came from.
    assert model.config.modified_bases == ["llm"] and model.config.llm_name_or_path == source
    assert model.get_output_embeddings().weight.shape[0] == model.config.text_config.vocab_size == LLM_VOCAB + 8
    assert not model.get_input_embeddings().weight.requires_grad  # the LLM stays frozen
    inputs = sample_inputs()
    inputs["input_ids"][0, -1] = LLM_VOCAB + 3  # one of the new tokens
    assert model.default_checkpoint_format() == "full"
    model.save_pretrained(tmp_path / "resized")
    reloaded = LayAlignForCausalLM.from_pretrained(tmp_path / "resized")
    assert logits(reloaded, inputs).shape[-1] == LLM_VOCAB + 8
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_a_layalign_only_folder_without_weights_names_what_to_do(tmp_path):
    """What a DeepSpeed ZeRO-3 run that gathers no weights for saving leaves: a config and no weights."""
    model = trained_model(tmp_path)
    model.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "model.safetensors").unlink()
    with pytest.raises(OSError, match="holds no LayAlign weights: neither model.safetensors nor model.safetensors.index.json"):
        LayAlignForCausalLM.from_pretrained(tmp_path / "saved")


def test_a_config_that_does_not_describe_its_weights_is_named(tmp_path):
    model = trained_model(tmp_path)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    config["adapted_llm_layers"] = [1]  # the weights were trained for both layers
    (tmp_path / "saved" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"`fusion.layer_mix.weight` \(4, 2\) \(this model: \(2, 2\)\).*`adapted_llm_layers`"):
        LayAlignForCausalLM.from_pretrained(tmp_path / "saved")
