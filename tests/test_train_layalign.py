"""`examples/train_layalign.py` end to end on tiny models: both stages, checkpoints, resume, LoRA, presets (DDP and the
sharding engines: test_scaling.py)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, TrainerCallback

from modeling_layalign import LayAlignForCausalLM
from modeling_layalign.training.data import LayAlignDataCollator

from .conftest import assert_same_logits


REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "examples"))

import train_layalign  # noqa: E402


def arguments(folders, output_dir, *extra) -> list[str]:
    return [
        "--encoder", folders["encoder"],
        "--llm", folders["llm"],
        "--output_dir", str(output_dir),
        "--languages", "de", "sw",
        "--max_train_examples", "64",
        "--per_device_train_batch_size", "4",
        "--max_steps", "3",
        "--logging_steps", "1",
        "--learning_rate", "1e-3",
        "--use_cpu",
        "--report_to", "none",
        "--disable_tqdm", "True",
        *extra,
    ]  # fmt: skip


def logged_losses(output_dir: Path) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_stage_one_writes_small_checkpoints_that_load(tiny_base_folders, tmp_path):
    train_layalign.main(arguments(tiny_base_folders, tmp_path, "--stage", "1", "--save_steps", "2"))
    for folder in (tmp_path / "checkpoint-2", tmp_path):
        weights = load_file(folder / "model.safetensors")
        assert weights and all(key.split(".")[0] in LayAlignForCausalLM.layalign_module_names for key in weights)
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert processor.max_length == 512
    batch = processor(["Bata wa Janet"], targets=["Janet"])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
    losses = logged_losses(tmp_path)
    assert len(losses) == 3


def test_logged_loss_is_the_mean_over_every_target_token(tiny_base_folders, tmp_path):
    trainer = train_layalign.main(
        arguments(
            tiny_base_folders, tmp_path, "--stage", "1", "--max_steps", "1", "--max_train_examples", "4",
            "--learning_rate", "0", "--encoder_dropout_in_training", "False", "--save_strategy", "no",
        )
    )  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[index] for index in range(4)])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**batch).loss.item()
    assert logged_losses(tmp_path) == [pytest.approx(expected, rel=1e-5)]


def peft_loaded_logits(checkpoint: Path, batch: dict) -> torch.Tensor:
    """A LoRA run's Trainer checkpoint loaded as peft loads any adapter: over the base its adapter config names."""
    model = AutoPeftModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize(
    "run",
    [("--stage", "1"), ("--stage", "2", "--lora_r", "4"), ("--stage", "2", "--lora_r", "4", "--merge_lora", "False"),
     ("--stage", "2", "--lora_r", "4", "--quantize", "int8")],
    ids=["stage-1", "lora-merged", "lora-kept", "lora-over-int8"],
)  # fmt: skip
def test_resumed_training_continues_exactly_where_it_stopped(run, tiny_base_folders, tmp_path):
    """A LoRA run's Trainer checkpoints are peft adapters; they survive the run's final save, resume it exactly and
    load with peft."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run = (*run, "--save_steps", "2", "--max_steps", "5")
    train_layalign.main(arguments(tiny_base_folders, straight, *run))
    assert {path.name for path in straight.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4", "checkpoint-5"}
    train_layalign.main(
        arguments(tiny_base_folders, resumed, *run, "--resume_from_checkpoint", str(straight / "checkpoint-2"))
    )
    weights = ["model.safetensors", *(["lora/adapter_model.safetensors"] if (straight / "lora").is_dir() else [])]
    for name in weights:
        expected, actual = load_file(straight / name), load_file(resumed / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}: {key}"
    # The resumed run carries the first two steps over from the checkpoint and logs the same last three.
    assert logged_losses(resumed) == logged_losses(straight)
    if "--lora_r" in run:  # the last checkpoint is the final model (merged: to float32 rounding)
        batch = AutoProcessor.from_pretrained(straight)(["Bata wa Janet"], targets=["Janet"])
        with torch.no_grad():
            final = LayAlignForCausalLM.from_pretrained(straight)(**batch).logits
        torch.testing.assert_close(peft_loaded_logits(straight / "checkpoint-5", batch), final, rtol=0, atol=1e-5)


def test_stage_two_starts_from_stage_one(tiny_base_folders, tmp_path):
    train_layalign.main(arguments(tiny_base_folders, tmp_path / "stage1", "--stage", "1"))
    stage_one = load_file(tmp_path / "stage1" / "model.safetensors")
    trainer = train_layalign.main(
        arguments(
            tiny_base_folders, tmp_path / "stage2", "--stage", "2", "--init_from", str(tmp_path / "stage1"),
            "--max_steps", "1", "--learning_rate", "0",
        )
    )  # fmt: skip
    # With a zero learning rate stage 2 keeps stage 1's weights: it started from them, not from scratch.
    stage_two = load_file(tmp_path / "stage2" / "model.safetensors")
    for key in stage_one:
        assert torch.equal(stage_one[key], stage_two[key]), key
    assert trainer.train_dataset[0]["labels"][0] == -100  # stage 2 masks the prompt


class TrainableNames(TrainerCallback):
    """Records which parameters train, as the run starts (a LoRA run merges its adapters when it saves)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_lora_trains_the_llm_adapters_and_the_layalign_modules(tiny_base_folders, tmp_path):
    recorder = TrainableNames()
    train_layalign.main(arguments(tiny_base_folders, tmp_path, "--stage", "2", "--lora_r", "4"), callbacks=[recorder])
    trainable = recorder.names
    assert any("lora_A" in name for name in trainable)
    assert any("gates.modules_to_save" in name for name in trainable)
    assert not any(".encoder." in name and "lora" in name for name in trainable)


def test_a_lora_run_saves_a_merged_checkpoint_that_reloads(tiny_base_folders, tmp_path):
    """The output of a LoRA run is what `--init_from` and evaluation load: the adapters merged, in a full checkpoint."""
    trainer = train_layalign.main(arguments(tiny_base_folders, tmp_path, "--stage", "2", "--lora_r", "4"))
    assert not (tmp_path / "adapter_model.safetensors").exists()
    reloaded = LayAlignForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.checkpoint_format == "full"
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    merged = trainer.model.get_base_model().eval()
    batch = LayAlignDataCollator(trainer.processing_class)([trainer.train_dataset[0], trainer.train_dataset[1]])
    batch = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, merged(**batch).logits, rtol=0, atol=1e-5)
    # A stage 2 from it trains the LayAlign modules only, over the merged LLM, and saves that LLM again.
    recorder = TrainableNames()
    again = train_layalign.main(
        arguments(tiny_base_folders, tmp_path / "again", "--stage", "2", "--init_from", str(tmp_path), "--max_steps", "1"),
        callbacks=[recorder],
    ).model.eval()
    assert recorder.names == {name for name in recorder.names if name.split(".", 1)[0] in reloaded.layalign_module_names}
    assert recorder.names and reloaded.config.modified_bases == again.config.modified_bases == ["llm"]
    stage_two = LayAlignForCausalLM.from_pretrained(tmp_path / "again")
    assert stage_two.config.checkpoint_format == "full"
    for name, weight in stage_two.llm.state_dict().items():
        assert torch.equal(weight, reloaded.llm.state_dict()[name]), name  # the merge is kept, and unchanged
    with torch.no_grad():
        assert torch.equal(stage_two(**batch).logits, again(**batch).logits)


class FinalLogits(TrainerCallback):
    """Records the trained model's logits on the first batch as the run ends, before the script saves it."""

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.batch = {key: value for key, value in next(iter(train_dataloader)).items() if key != "labels"}
        with torch.no_grad():
            self.logits = model.eval()(**self.batch).logits


def test_a_lora_kept_as_an_adapter_over_a_full_precision_llm_reloads_and_goes_on_training(tiny_base_folders, tmp_path):
    """`--merge_lora False`: the LayAlign weights LayAlign-only and the LoRA in `lora/`, reloaded as trained; a stage 2
    `--init_from` it trains the same LoRA and keeps it again."""
    stage_one = FinalLogits()
    lora_run = ("--lora_r", "4", "--merge_lora", "False", "--learning_rate", "1e-2")
    train_layalign.main(arguments(tiny_base_folders, tmp_path / "stage1", "--stage", "1", *lora_run), callbacks=[stage_one])
    saved = load_file(tmp_path / "stage1" / "model.safetensors")
    assert not any(key.startswith(("llm.", "encoder.")) for key in saved)  # no base weight: megabytes, not the LLM
    # The LoRA alone: the LayAlign modules are in the checkpoint's own file, not copied into the adapter's too.
    assert all(".lora_" in key for key in load_file(tmp_path / "stage1" / "lora" / "adapter_model.safetensors"))
    assert json.loads((tmp_path / "stage1" / "lora" / "adapter_config.json").read_text())["modules_to_save"] is None
    reloaded = LayAlignForCausalLM.from_pretrained(tmp_path / "stage1")
    assert reloaded.config.checkpoint_format == "layalign_only" and not reloaded.config.modified_bases
    with torch.no_grad():
        assert_same_logits(reloaded(**stage_one.batch).logits, stage_one.logits)
        without_lora = LayAlignForCausalLM.from_pretrained(tmp_path / "stage1", load_lora=False)
        assert not torch.equal(without_lora(**stage_one.batch).logits, stage_one.logits)
    # Merged as the vLLM plugin asks (it serves no kept LoRA): a full checkpoint of the same model.
    adapter = PeftModel.from_pretrained(without_lora, tmp_path / "stage1" / "lora")
    train_layalign.merge_lora(adapter).save_pretrained(tmp_path / "merged")
    merged = LayAlignForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.checkpoint_format == "full"
    with torch.no_grad():
        torch.testing.assert_close(merged(**stage_one.batch).logits, stage_one.logits, rtol=0, atol=1e-5)

    stage_two = FinalLogits()
    train_layalign.main(
        arguments(tiny_base_folders, tmp_path / "stage2", "--stage", "2", "--init_from", str(tmp_path / "stage1"), *lora_run),
        callbacks=[stage_two],
    )
    adapters = [load_file(tmp_path / stage / "lora" / "adapter_model.safetensors") for stage in ("stage1", "stage2")]
    assert adapters[0].keys() == adapters[1].keys()  # the same LoRA, trained on
    assert any(not torch.equal(adapters[1][key], value) for key, value in adapters[0].items())
    modules = [load_file(tmp_path / stage / "model.safetensors") for stage in ("stage1", "stage2")]
    assert any(not torch.equal(modules[1][key], value) for key, value in modules[0].items())  # and the LayAlign modules
    with torch.no_grad():
        assert_same_logits(LayAlignForCausalLM.from_pretrained(tmp_path / "stage2")(**stage_two.batch).logits, stage_two.logits)
    # Its checkpoints go over the model it started from without stage 1's LoRA (saved in `lora_base/`), not over
    # stage 1, which would attach that LoRA a second time.
    torch.testing.assert_close(peft_loaded_logits(tmp_path / "stage2" / "checkpoint-3", stage_two.batch), stage_two.logits)

    # A kept LoRA saved before 2026-12-07 (peft's own save, with its copies of the LayAlign modules) still loads and
    # trains on: at learning rate 0 it ends as it began.
    shutil.copytree(tmp_path / "stage1", tmp_path / "older", ignore=shutil.ignore_patterns("lora", "checkpoint-*"))
    without_lora = LayAlignForCausalLM.from_pretrained(tmp_path / "stage1", load_lora=False)
    train_layalign.train_kept_lora(without_lora, tmp_path / "stage1" / "lora").save_pretrained(tmp_path / "older" / "lora")
    assert any(".lora_" not in key for key in load_file(tmp_path / "older" / "lora" / "adapter_model.safetensors"))
    with torch.no_grad():
        assert_same_logits(LayAlignForCausalLM.from_pretrained(tmp_path / "older")(**stage_one.batch).logits, stage_one.logits)
    train_layalign.main(
        arguments(
            tiny_base_folders, tmp_path / "continued", "--stage", "1", "--init_from", str(tmp_path / "older"),
            "--lora_r", "4", "--merge_lora", "False", "--learning_rate", "0", "--max_steps", "1",
        )
    )  # fmt: skip
    with torch.no_grad():
        assert_same_logits(LayAlignForCausalLM.from_pretrained(tmp_path / "continued")(**stage_one.batch).logits, stage_one.logits)


@pytest.mark.parametrize("method", ["int8", "quanto-int8"])
def test_both_stages_over_a_quantized_llm_reload_as_trained(method, tiny_base_folders, tmp_path):
    stage_one = FinalLogits()
    train_layalign.main(
        arguments(tiny_base_folders, tmp_path / "stage1", "--stage", "1", "--quantize", method, "--gradient_checkpointing"),
        callbacks=[stage_one],
    )
    reloaded = LayAlignForCausalLM.from_pretrained(tmp_path / "stage1")
    assert reloaded.config.text_config.quantization_config  # recorded, and applied again
    with torch.no_grad():
        assert_same_logits(reloaded(**stage_one.batch).logits, stage_one.logits)

    # Stage 2 with LoRA from it (`--init_from` loads the LLM quantized again): the LoRA stays an adapter.
    stage_two = FinalLogits()
    train_layalign.main(
        arguments(
            tiny_base_folders, tmp_path / "stage2", "--stage", "2", "--init_from", str(tmp_path / "stage1"),
            "--lora_r", "4", "--learning_rate", "1e-2",
        ),
        callbacks=[stage_two],
    )  # fmt: skip
    assert (tmp_path / "stage2" / "lora" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "stage2" / "config.json").read_text())["checkpoint_format"] == "layalign_only"
    reloaded = LayAlignForCausalLM.from_pretrained(tmp_path / "stage2")
    projection = reloaded.llm.get_decoder().layers[0].self_attn.k_proj  # a LoRA layer over the quantized one
    assert type(projection.base_layer) is type(reloaded_projection(tmp_path / "stage1")) is not torch.nn.Linear
    with torch.no_grad():
        assert_same_logits(reloaded(**stage_two.batch).logits, stage_two.logits)
        without_lora = LayAlignForCausalLM.from_pretrained(tmp_path / "stage2", load_lora=False)
        assert not torch.equal(without_lora(**stage_two.batch).logits, stage_two.logits)
    with pytest.raises(ValueError, match="carries a LoRA adapter"):
        reloaded.save_pretrained(tmp_path / "again")
    # Its Trainer checkpoints load with peft over stage 1, quantized again.
    assert not (tmp_path / "stage2" / train_layalign.LORA_BASE_SUBFOLDER).exists()
    torch.testing.assert_close(peft_loaded_logits(tmp_path / "stage2" / "checkpoint-3", stage_two.batch), stage_two.logits)

    # `--init_from` it goes on training the same LoRA, from the same model: at learning rate 0 it ends as it began.
    with pytest.raises(SystemExit, match="pass `--lora_r` to go on training it"):
        train_layalign.main(arguments(tiny_base_folders, tmp_path / "stage3", "--stage", "2", "--init_from", str(tmp_path / "stage2")))
    train_layalign.main(
        arguments(
            tiny_base_folders, tmp_path / "again", "--stage", "2", "--init_from", str(tmp_path / "stage2"),
            "--lora_r", "4", "--learning_rate", "0", "--max_steps", "1",
        )
    )  # fmt: skip
    continued = LayAlignForCausalLM.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert_same_logits(continued(**stage_two.batch).logits, stage_two.logits)


def test_a_quantization_method_that_cannot_run_is_named(monkeypatch):
    with pytest.raises(SystemExit, match="Unknown `--quantize` 'int3'; pass one of"):
        train_layalign.quantization_config("int3", torch.float32)

    def without_torchao():
        raise ImportError("No module named 'torchao'", name="torchao")

    monkeypatch.setitem(train_layalign.QUANTIZATION_METHODS, "torchao-int8", lambda dtype: without_torchao())
    with pytest.raises(SystemExit, match="`--quantize torchao-int8` needs torchao: `pip install torchao`"):
        train_layalign.quantization_config("torchao-int8", torch.float32)


def reloaded_projection(folder):
    return LayAlignForCausalLM.from_pretrained(folder).llm.get_decoder().layers[0].self_attn.k_proj


def test_gradient_checkpointing_and_half_precision_bases(tiny_base_folders, tmp_path):
    trainer = train_layalign.main(
        arguments(tiny_base_folders, tmp_path, "--gradient_checkpointing", "--dtype", "bfloat16", "--bf16")
    )
    assert trainer.model.llm.is_gradient_checkpointing
    assert trainer.model.llm.dtype == torch.bfloat16 and trainer.model.fusion.projection.weight.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(loss)) for loss in logged_losses(tmp_path))
    with pytest.raises(SystemExit, match="add `--bf16` or `--fp16`"):
        train_layalign.main(arguments(tiny_base_folders, tmp_path / "x", "--dtype", "bfloat16"))


@pytest.mark.parametrize("preset", sorted(path.stem for path in (REPOSITORY / "configuration" / "presets").glob("*.json")))
@pytest.mark.parametrize("stage", [1, 2])
def test_presets_name_real_fields(preset, stage):
    # `--use_cpu` lets the GPU presets (bf16) parse on this machine; it is also a flag on top of a preset.
    model_args, data_args, training_args = train_layalign.parse_arguments(
        ["--preset", preset, "--stage", str(stage), "--use_cpu"]
    )
    values = json.loads((REPOSITORY / "configuration" / "presets" / f"{preset}.json").read_text())
    assert set(values) <= {"description", "model", "data", "stage1", "stage2"}
    for key, value in {**values.get("model", {}), **values.get("data", {}), **values[f"stage{stage}"]}.items():
        parsed = next(getattr(group, key) for group in (model_args, data_args, training_args) if hasattr(group, key))
        parsed = [] if parsed == [] else getattr(parsed, "value", parsed)  # enums, and report_to "none" -> []
        assert parsed == value or str(parsed) == str(value) or (value == "none" and parsed == []), key
    overridden = train_layalign.parse_arguments(
        ["--preset", preset, "--stage", str(stage), "--use_cpu", "--learning_rate", "0.5"]
    )
    assert overridden[2].learning_rate == 0.5 and data_args.stage == stage


def test_the_seed_fixes_the_initialisation_and_the_run(tiny_base_folders, tmp_path):
    weights = []
    for run, outside_seed in enumerate((11, 12)):
        torch.manual_seed(outside_seed)
        train_layalign.main(arguments(tiny_base_folders, tmp_path / str(run), "--stage", "1", "--save_strategy", "no"))
        weights.append(load_file(tmp_path / str(run) / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert logged_losses(tmp_path / "0") == logged_losses(tmp_path / "1")


def test_stage_one_logs_the_collapse_monitor_and_warm_starts_the_mapping_on_request(tiny_base_folders, tmp_path):
    runs = {}
    for name, extra in (("random", ()), ("warm", ("--warm_start_sentences", "16", "--warm_start_pairs", "8"))):
        runs[name] = train_layalign.main(
            arguments(tiny_base_folders, tmp_path / name, "--stage", "1", "--learning_rate", "0", "--save_strategy", "no",
                      *extra)
        )  # fmt: skip
    history = json.loads((tmp_path / "random" / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert all(0 < entry["layalign/source_cosine"] <= 1 and entry["layalign/norm_ratio"] > 0 for entry in logged)
    assert all(entry["layalign/gate_max_abs"] == 0 for entry in logged)
    # The same seed builds the same random mapping; only the warm start moves it (the learning rate is zero).
    random, warm = (runs[name].model.input_mapping.down.weight for name in ("random", "warm"))
    assert not torch.equal(random, warm)


def test_resuming_a_checkpoint_of_another_run_is_refused(tiny_base_folders, tmp_path):
    from .test_modeling_layalign_checkpoints import save_base

    run = tmp_path / "run"
    train_layalign.main(arguments(tiny_base_folders, run, "--stage", "1", "--save_steps", "2", "--max_steps", "2"))
    other_llm = save_base(tmp_path / "other", "llm", "llama", seed=11)  # same shape, other weights
    AutoTokenizer.from_pretrained(tiny_base_folders["llm"]).save_pretrained(other_llm)
    resume = ("--resume_from_checkpoint", str(run / "checkpoint-2"))
    with pytest.raises(ValueError, match="was trained over other bases than this run's.*has other weights"):
        train_layalign.main(arguments({**tiny_base_folders, "llm": other_llm}, tmp_path / "a", *resume))
    with pytest.raises(ValueError, match=r"other LayAlign modules: use_layer_fusion=True \(this run: False\)"):
        train_layalign.main(arguments(tiny_base_folders, tmp_path / "b", "--use_layer_fusion", "False", *resume))
    with pytest.raises(ValueError, match="is not a training checkpoint: it holds no trainer_state.json"):
        train_layalign.main(arguments(tiny_base_folders, tmp_path / "c", "--resume_from_checkpoint", str(tmp_path / "other")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "holds no training example"),
        (b'{"question": "x", "answer": "y"}\n', r"line 1: no string field `source`, `target`"),
        (b'{"source": "a", "target": "b"}\n{"source": "\xff", "target": "b"}\n', "line 2: not UTF-8 text"),
        (b'{"source": "a", "target": "b"}\n{"source": "a", \n', "line 2: not valid JSON"),
        (b'{"source": "a", "target": "b", "prompt": ["p"]}\n', "line 1: `prompt` must be a string, got list"),
        (b'{"source": "a", "target": "b", "prompt": 5}\n', "line 1: `prompt` must be a string, got int"),
        (b'{"source": "a", "target": "b", "source": "c"}\n', "line 1: the key `source` appears twice"),
        (b'{"source": "a\\ud800", "target": "b"}\n', "line 1: `source` holds a lone surrogate escape"),
    ],
)
def test_a_bad_train_file_is_named_with_its_line(tiny_base_folders, tmp_path, content, message):
    train_file = tmp_path / "train.jsonl"
    train_file.write_bytes(content)
    with pytest.raises(ValueError, match=rf"train.jsonl,? {message}"):
        train_layalign.main(arguments(tiny_base_folders, tmp_path / "out", "--train_file", str(train_file)))


def test_a_stage_started_from_a_checkpoint_trains_the_llm_on_request_and_keeps_its_architecture(tiny_base_folders, tmp_path):
    train_layalign.main(
        arguments(tiny_base_folders, tmp_path / "stage1", "--stage", "1", "--max_steps", "1", "--mapped_encoder_layer", "1")
    )
    recorder = TrainableNames()
    train_layalign.main(
        arguments(tiny_base_folders, tmp_path / "stage2", "--stage", "2", "--init_from", str(tmp_path / "stage1"),
                  "--max_steps", "1", "--train_llm", "True"),
        callbacks=[recorder],
    )  # fmt: skip
    assert any(name.startswith("llm.") for name in recorder.names)  # ignored before: the LLM stayed frozen
    reloaded = LayAlignForCausalLM.from_pretrained(tmp_path / "stage2")
    assert reloaded.config.train_llm and "llm" in reloaded.config.modified_bases
    assert reloaded.config.mapped_encoder_layer == 1  # stage 1's architecture
    with pytest.raises(SystemExit, match=r"`--mapped_encoder_layer 2` asks for another architecture .* \(mapped_encoder_layer = 1\)"):
        train_layalign.main(
            arguments(tiny_base_folders, tmp_path / "other", "--stage", "2", "--init_from", str(tmp_path / "stage1"),
                      "--mapped_encoder_layer", "2"),
        )  # fmt: skip
    with pytest.raises(SystemExit, match=r"`--use_layer_fusion False` asks for another architecture than .* \(use_layer_fusion = True\)"):
        train_layalign.main(
            arguments(tiny_base_folders, tmp_path / "other", "--stage", "2", "--init_from", str(tmp_path / "stage1"),
                      "--use_layer_fusion", "False"),
        )  # fmt: skip
