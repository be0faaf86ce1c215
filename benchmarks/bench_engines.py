"""One stage-1 training step under the sharding engines, on one device (world size 1), against the same step unwrapped.

    python benchmarks/bench_engines.py --preset paper --json results/engines.json    # one GPU (issue 15's check)
    python benchmarks/bench_engines.py --preset tiny                                  # a dry run on a CPU (gloo)

What runs on one device is each engine's own code path, not its scaling: FSDP 2 set up by accelerate's own
`fsdp2_prepare_model` from `configuration/accelerate/fsdp.yaml` (every encoder block and LLM layer a unit), and
DeepSpeed ZeRO-2 from `configuration/accelerate/deepspeed_zero2.yaml` through accelerate's `DeepSpeedPlugin` and
`deepspeed.initialize` (needs `deepspeed`; skipped with a message when it is not installed). Each engine gets a fresh
LayAlign model over fresh bases of the preset (the `paper` preset: mT5-xl + Llama-2-7B shapes at random init, bf16
bases, float32 LayAlign modules), one after the other, so that only one model is on the device at a time. The
unwrapped step (AdamW, autocast) is the baseline; the table gives each engine's median time per step, its ratio to
the baseline and its peak memory, and the loss of the first step, which must be the same for every engine (same
seed, same batch).
"""

import gc
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import yaml

from modeling_layalign.training.distributed_exit import exit_without_finalization

from common import (
    PRESETS,
    argument_parser,
    autocast_for,
    build_models,
    describe_device,
    format_memory,
    interleaved_median_seconds,
    peak_memory_gib,
    print_table,
    training_batch,
    write_json,
)


ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "configuration" / "accelerate"
ENGINES = ("unwrapped", "FSDP 2", "ZeRO-2")


def unwrapped_step(model, preset) -> Callable[[dict], torch.Tensor]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    autocast = autocast_for(preset.device, preset.dtype)

    def step(batch: dict) -> torch.Tensor:
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def fsdp2_step(model, preset) -> Callable[[dict], torch.Tensor]:
    """accelerate's own FSDP 2 preparation (what `Trainer` runs), with the shipped config's wrap policy. Mixed
    precision is left to autocast, as in the unwrapped step, so the two compute the same."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    fsdp_config = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp_config["fsdp_version"],
        auto_wrap_policy=fsdp_config["fsdp_auto_wrap_policy"].lower(),
        reshard_after_forward=fsdp_config["fsdp_reshard_after_forward"],
        state_dict_type=fsdp_config["fsdp_state_dict_type"],
    )
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision="no",
        is_main_process=True,
        device=torch.device(preset.device),
        torch_device_mesh=None,
    )
    return unwrapped_step(fsdp2_prepare_model(accelerator, model), preset)


def zero2_step(model, preset) -> Callable[[dict], torch.Tensor]:
    """DeepSpeed ZeRO-2 from the shipped config, with the values accelerate fills in for its "auto" entries."""
    import deepspeed
    from accelerate.utils import DeepSpeedPlugin

    deepspeed_config = yaml.safe_load((ACCELERATE_CONFIGS / "deepspeed_zero2.yaml").read_text())["deepspeed_config"]
    plugin = DeepSpeedPlugin(
        zero_stage=deepspeed_config["zero_stage"],
        gradient_clipping=deepspeed_config["gradient_clipping"],
        offload_optimizer_device=deepspeed_config["offload_optimizer_device"],
        offload_param_device=deepspeed_config["offload_param_device"],
    )
    config = {key: value for key, value in plugin.deepspeed_config.items() if value != "auto"}
    config["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items() if v != "auto"}
    config.update(train_micro_batch_size_per_gpu=preset.train_batch, gradient_accumulation_steps=1)
    config["zero_allow_untested_optimizer"] = True
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-5), config=config)
    autocast = autocast_for(preset.device, preset.dtype)

    def step(batch: dict) -> torch.Tensor:
        with autocast():
            loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step


WRAPPERS = {"unwrapped": unwrapped_step, "FSDP 2": fsdp2_step, "ZeRO-2": zero2_step}


def measure(engine: str, preset_name: str, repeats: int) -> dict | None:
    """Median seconds, peak memory and first loss of one engine's step, on a fresh model (seed 0)."""
    if engine == "ZeRO-2":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            print("ZeRO-2 skipped: deepspeed is not installed (pip install deepspeed, or carry its wheel)")
            return None
    models = build_models(preset_name)
    model, preset = models.layalign, models.preset
    del models
    model.train()
    batch = training_batch(  # stage 1: every text token a target
        model.config, preset.train_batch, preset.encoder_len, preset.stage1_text_len, preset.device
    )
    step = WRAPPERS[engine](model, preset)
    first_loss = step(batch).float().item()
    seconds = interleaved_median_seconds({engine: lambda: step(batch)}, preset.device, repeats, warmup=1)[engine]
    result = {"seconds": seconds, "peak_memory_gib": peak_memory_gib(lambda: step(batch), preset.device), "first_loss": first_loss}
    del model, step
    gc.collect()
    if preset.device == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__, repeats=5)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if preset.device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if preset.device == "cuda" else "gloo")
    results = {"preset": args.preset, "device": describe_device(preset.device), "dtype": str(preset.dtype)}
    for engine in ENGINES:
        results[engine] = measure(engine, args.preset, args.repeats)
    baseline = results["unwrapped"]["seconds"]
    rows = [
        [
            engine,
            f"{entry['seconds'] * 1000:.1f}",
            f"{entry['seconds'] / baseline:.2f}x",
            format_memory(entry["peak_memory_gib"]),
            f"{entry['first_loss']:.6f}",
        ]
        for engine in ENGINES
        if (entry := results[engine]) is not None
    ]
    print_table(
        f"stage-1 training step under each engine, world size 1, preset {args.preset} ({results['device']}, "
        f"{preset.dtype}): batch {preset.train_batch}, median of {args.repeats}",
        ["engine", "ms / step", "vs unwrapped", "peak GiB", "first loss"],
        rows,
    )
    write_json(results, args.json)
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
    exit_without_finalization()  # the engines keep the process group alive (see modeling_layalign.training.distributed_exit)
