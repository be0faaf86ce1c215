"""LayAlign under the engines its users scale out with, each with 2 CPU processes over gloo, on tiny bases: the
training script under `accelerate launch` with the shipped DDP and DeepSpeed configs (DeepSpeed runs on CPU processes
when the Trainer is given `--ddp_backend gloo` instead of `--use_cpu`), and FSDP 2, FSDP 1, DeepSpeed ZeRO-2 and
ZeRO-3 through `tests/distributed/engine_worker.py`, which sets each engine up from its shipped accelerate config
(accelerate runs FSDP only on accelerators). Every shipped accelerate config runs here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "examples"))

import train_layalign  # noqa: E402
from tests.conftest import free_port, save_tiny_bases  # noqa: E402
from tests.test_train_layalign import arguments, logged_losses  # noqa: E402


WORKER = REPOSITORY / "tests" / "distributed" / "engine_worker.py"
ENGINE_CONFIGS = {"fsdp2": "fsdp.yaml", "fsdp1": "fsdp1.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}
LAUNCHED_CONFIGS = {"cpu_ddp.yaml": 2, "multi_gpu_ddp.yaml": 2, "single_gpu.yaml": 1}
DEEPSPEED_CONFIGS = ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml")


def run(command: list[str], succeeds: bool = True, environment: dict[str, str] | None = None) -> str:
    """Runs `command` (with `environment` added), asserts that it succeeds (or fails), and returns what it printed."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", **(environment or {})}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert (result.returncode == 0) == succeeds, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def launch(
    config: str | Path, processes: int, script_arguments: list[str], succeeds: bool = True, environment: dict | None = None
) -> str:
    return run([
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPOSITORY / "configuration" / "accelerate" / config),
        "--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", free_port(),
        str(REPOSITORY / "examples" / "train_layalign.py"), *script_arguments,
    ], succeeds, environment)  # fmt: skip


def test_every_shipped_accelerate_config_runs_here():
    shipped = {path.name for path in (REPOSITORY / "configuration" / "accelerate").glob("*.yaml")}
    assert shipped == set(ENGINE_CONFIGS.values()) | set(LAUNCHED_CONFIGS) | set(DEEPSPEED_CONFIGS)


@pytest.mark.parametrize("config", sorted(LAUNCHED_CONFIGS))
def test_accelerate_launch_matches_one_process(config, tiny_base_folders, tmp_path):
    processes = LAUNCHED_CONFIGS[config]
    common = ("--stage", "1", "--save_strategy", "no", "--encoder_dropout_in_training", "False", "--seed", "3")
    train_layalign.main(arguments(tiny_base_folders, tmp_path / "one", *common))
    # Each process records that its exit hooks ran: a launched run leaves without the interpreter's finalization
    # (`train_layalign.leave_launched_run`), and nothing registered with `atexit` may be lost by that.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import atexit, os, pathlib, sys\n"
        "def record():\n"
        "    if sys.argv[0].endswith('train_layalign.py'):\n"
        "        pathlib.Path(os.environ['EXIT_HOOKS'], 'rank-' + os.environ.get('RANK', '0')).touch()\n"
        "atexit.register(record)\n"
    )
    hooks = {"PYTHONPATH": str(tmp_path / "site"), "EXIT_HOOKS": str(tmp_path)}
    launch(
        config,
        processes,
        arguments(tiny_base_folders, tmp_path / "launched", *common, "--per_device_train_batch_size", str(4 // processes)),
        environment=hooks,
    )
    assert sorted(path.name for path in tmp_path.glob("rank-*")) == [f"rank-{rank}" for rank in range(processes)]
    state = json.loads((tmp_path / "launched" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    one, launched = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "launched")
    assert len(launched) == 3
    # Same seed, same examples per step, every target token counted across the processes: only the order of float
    # reductions differs (measured: relative differences below 1e-7).
    assert launched == pytest.approx(one, rel=1e-5)


def deepspeed_arguments(folders: dict[str, str], output_dir: Path, *extra: str) -> list[str]:
    """The training script's arguments for 2 CPU processes under DeepSpeed: accelerate sets DeepSpeed up on CPU
    processes only without `--use_cpu` and with a backend named."""
    script = arguments(folders, output_dir, "--per_device_train_batch_size", "2", *extra)
    return [argument for argument in script if argument != "--use_cpu"] + ["--ddp_backend", "gloo"]


@pytest.mark.parametrize("config", DEEPSPEED_CONFIGS)
def test_trainer_under_deepspeed_matches_one_process_and_resumes_exactly(config, tiny_base_folders, tmp_path):
    common = ("--stage", "1", "--encoder_dropout_in_training", "False", "--seed", "3", "--save_steps", "2", "--max_steps", "5")
    train_layalign.main(arguments(tiny_base_folders, tmp_path / "one", *common))
    launch(config, 2, deepspeed_arguments(tiny_base_folders, tmp_path / "launched", *common))
    checkpoint = str(tmp_path / "launched" / "checkpoint-2")
    # Three steps after resuming (ZeRO-3 once failed at the second: a weight read outside its module's forward).
    launch(config, 2, deepspeed_arguments(tiny_base_folders, tmp_path / "resumed", *common, "--resume_from_checkpoint", checkpoint))

    # The collapse monitor ran on both processes and logged from the first.
    history = json.loads((tmp_path / "launched" / "trainer_state.json").read_text())["log_history"]
    assert all("layalign/source_cosine" in entry for entry in history if "loss" in entry)
    # Same examples per step, every target token counted across the processes (measured: losses within 1e-7
    # relative, trained weights within 3e-8).
    assert logged_losses(tmp_path / "launched") == pytest.approx(logged_losses(tmp_path / "one"), rel=1e-5)
    one, launched = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "launched" / "model.safetensors")
    assert launched.keys() == one.keys()  # the LayAlign weights, gathered whole by ZeRO-3 for the save
    assert max((launched[key] - one[key]).abs().max().item() for key in one) < 1e-5
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(resumed[key], launched[key]) for key in launched)
    assert logged_losses(tmp_path / "resumed") == logged_losses(tmp_path / "launched")

    # DeepSpeed's state loads only into the engine that saved it: another stage or process count is refused before
    # the first step, with what to do instead.
    other_stage = DEEPSPEED_CONFIGS[1 - DEEPSPEED_CONFIGS.index(config)]
    for other_config, processes in ((other_stage, 2), (config, 1)):
        output = tmp_path / f"elsewhere-{processes}"
        printed = launch(
            other_config,
            processes,
            deepspeed_arguments(tiny_base_folders, output, *common, "--resume_from_checkpoint", checkpoint),
            succeeds=False,
        )
        assert "DeepSpeed loads it only into the same engine" in printed and "--init_from" in printed
        assert not list(output.glob("checkpoint-*"))


def test_zero3_that_would_save_no_weights_is_refused_before_training(tiny_base_folders, tmp_path):
    config = (REPOSITORY / "configuration" / "accelerate" / "deepspeed_zero3.yaml").read_text()
    assert "zero3_save_16bit_model: true" in config
    unsaving = tmp_path / "zero3_unsaving.yaml"
    unsaving.write_text(config.replace("zero3_save_16bit_model: true", "zero3_save_16bit_model: false"))
    printed = launch(unsaving, 2, deepspeed_arguments(tiny_base_folders, tmp_path / "out", "--stage", "1"), succeeds=False)
    assert "`zero3_save_16bit_model: true`" in printed
    assert not (tmp_path / "out" / "trainer_state.json").exists()


def test_lora_under_zero3_saves_the_merged_model_of_one_process(tiny_base_folders, tmp_path):
    # peft's LoRA on the LLM, merged at the end: under ZeRO-3 the merge must see whole weights (measured: the merged
    # weights within 7e-7 of one process's).
    common = ("--stage", "2", "--lora_r", "4", "--save_strategy", "no", "--encoder_dropout_in_training", "False", "--seed", "3")
    train_layalign.main(arguments(tiny_base_folders, tmp_path / "one", *common))
    launch("deepspeed_zero3.yaml", 2, deepspeed_arguments(tiny_base_folders, tmp_path / "launched", *common))
    one, launched = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "launched" / "model.safetensors")
    assert launched.keys() == one.keys() and any(key.startswith("llm.") for key in one)  # a full, merged checkpoint
    assert max((launched[key] - one[key]).abs().max().item() for key in one) < 1e-5


@pytest.fixture(scope="module")
def tied_base_folders(tmp_path_factory) -> dict[str, str]:
    """The tiny bases with the LLM's input and output embeddings tied (as in SmolLM2, Qwen2.5-0.5B, Gemma)."""
    return save_tiny_bases(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


def run_engine(engine: str, bases: dict[str, str], output_dir: Path) -> list[dict]:
    run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
        str(WORKER), engine, bases["encoder"], bases["llm"], str(output_dir),
    ])  # fmt: skip
    return [json.loads((output_dir / f"result-{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("engine", sorted(ENGINE_CONFIGS))
def test_sharded_training_matches_one_process(engine, tiny_base_folders, tmp_path):
    results = run_engine(engine, tiny_base_folders, tmp_path)
    for result in results:
        # Measured on every engine: 4.8252034 against 4.8252039; weights after a step within 8e-8 (float32 sums in
        # another order); reloaded logits within 2e-7; the three resumed steps bit for bit.
        assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
        assert result["step_difference"] < 1e-6
        assert result["generate_equal"]
        assert result["resume_difference"] == 0.0  # after three steps from the checkpoint
        assert result["resumed_losses_equal"]
        assert result["statistics_difference"] < 1e-5  # the monitor gathers what it reads (measured: up to 5e-7)
    assert results[0]["reload_logit_difference"] < 1e-5
    # ZeRO-3's config turns `zero3_init_flag` on: the bases load already partitioned, so no process ever holds them
    # whole (what lets a 70B LLM load on a machine whose CPU memory holds one copy, not eight). The other engines
    # shard after loading.
    for loading in ("loading", "reloading"):
        held = [result[f"base_elements_held_after_{loading}"] for result in results]
        assert held == [0, 0] if engine == "zero3" else min(held) > 0


def test_fsdp2_with_tied_embeddings(tied_base_folders, tmp_path):
    # accelerate's FSDP 2 preparation shards tied input and output embeddings as one unit with the final norm; LayAlign
    # reaches the embeddings through the LLM (measured: loss 4.8298073 against 4.8298068, every check as untied).
    results = run_engine("fsdp2", tied_base_folders, tmp_path)
    for result in results:
        assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
        assert result["step_difference"] < 1e-6
        assert result["generate_equal"]
        assert result["resume_difference"] == 0.0
    assert results[0]["reload_logit_difference"] < 1e-5
