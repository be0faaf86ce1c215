"""Checks, before a `Trainer` run takes its first step, that its engine will save the model's weights and can resume
from the checkpoint it is given.

DeepSpeed keeps its own training state in a `Trainer` checkpoint (`global_step<N>/`: one optimizer partition per
process, and under ZeRO-3 one model partition per process) and loads it only into an engine of the same ZeRO stage
over the same number of processes; and ZeRO-3 without `stage3_gather_16bit_weights_on_model_save`
(`zero3_save_16bit_model` in an accelerate config) saves no model weights at all, only that state. Unchecked, both
show late: a finished run whose output folder cannot be loaded, or DeepSpeed's raw size error on resuming.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from transformers import Trainer


# What to do instead of resuming, for every refusal below.
START_OVER_HINT = (
    "Resume with the engine and the number of processes it was saved with, or start a new run from the LayAlign "
    "weights it holds with `--init_from` (`from_pretrained` of the checkpoint folder)."
)


@dataclass(frozen=True)
class EngineLayout:
    """How a run shards its training state: `zero_stage` is None without DeepSpeed (its state then loads into any
    number of processes), 3 for ZeRO-3, 2 for ZeRO-1 and ZeRO-2 (their checkpoints have the same layout)."""

    zero_stage: int | None
    processes: int

    def describe(self) -> str:
        if self.zero_stage is None:
            return "no DeepSpeed"
        stages = "ZeRO-3" if self.zero_stage == 3 else "ZeRO-1/2"
        return f"DeepSpeed {stages} over {self.processes} process{'es' if self.processes > 1 else ''}"


def checkpoint_layout(checkpoint: str | os.PathLike) -> EngineLayout:
    """The layout of the training state in a `Trainer` checkpoint folder, read from DeepSpeed's file names."""
    folder = Path(checkpoint)
    latest = folder / "latest"
    tags = [latest.read_text().strip()] if latest.is_file() else sorted(path.name for path in folder.glob("global_step*"))
    if not tags:
        return EngineLayout(zero_stage=None, processes=0)
    state = folder / tags[-1]
    optimizer_partitions = list(state.glob("*zero_pp_rank_*_optim_states.pt"))
    zero3 = any(state.glob("*zero_pp_rank_*_model_states.pt"))
    return EngineLayout(zero_stage=3 if zero3 else 2, processes=len(optimizer_partitions))


def running_layout(trainer: Trainer) -> EngineLayout:
    """The layout of `trainer`'s own run."""
    if not trainer.is_deepspeed_enabled:
        return EngineLayout(zero_stage=None, processes=trainer.args.world_size)
    stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
    return EngineLayout(zero_stage=3 if stage == 3 else 2, processes=trainer.args.world_size)


def check_resume_fits_engine(trainer: Trainer, checkpoint: str | os.PathLike) -> None:
    """Raises a `ValueError` naming `checkpoint` when its DeepSpeed state cannot load into `trainer`'s engine (another
    ZeRO stage, another number of processes, or DeepSpeed on one side only)."""
    saved, running = checkpoint_layout(checkpoint), running_layout(trainer)
    if saved.zero_stage is None and running.zero_stage is None:
        return
    if saved != running:
        raise ValueError(
            f"`resume_from_checkpoint` {os.fspath(checkpoint)!r} holds the training state of {saved.describe()}, "
            f"but this run uses {running.describe()}: DeepSpeed loads it only into the same engine. {START_OVER_HINT}"
        )


def check_engine_saves_weights(trainer: Trainer) -> None:
    """Raises a `ValueError` when `trainer` runs DeepSpeed ZeRO-3 without gathering the weights for saving: `Trainer`
    would then save a config and DeepSpeed's sharded state but no model weights, at the end of the whole run."""
    if not trainer.is_deepspeed_enabled:
        return
    plugin = trainer.accelerator.state.deepspeed_plugin
    if plugin.zero_stage == 3 and not plugin.zero3_save_16bit_model:
        raise ValueError(
            "DeepSpeed ZeRO-3 is set to save no model weights (`stage3_gather_16bit_weights_on_model_save` false): "
            "the run's checkpoints and output would hold no LayAlign weights. Set `zero3_save_16bit_model: true` in "
            "the accelerate config (as configuration/accelerate/deepspeed_zero3.yaml does) or "
            "`stage3_gather_16bit_weights_on_model_save: true` in the DeepSpeed config."
        )
