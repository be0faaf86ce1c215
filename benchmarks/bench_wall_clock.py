"""The CPU wall-clock table of issue 29 in one command: decoding, prefill and a training step, each against its
baseline measured in the same process, run back to back.

    python benchmarks/bench_wall_clock.py --preset demo --threads 2 --runs 2

Shapes are the preset's (`demo`: e5-small + SmolLM2-135M, float32, every LLM layer adapted, gates at 0.1 so the
fused branch is computed; 48 encoder + 64 prompt tokens and 32 new tokens, greedy; a training step of 8 examples
of 48 + 48 tokens). Decoding and prefill compare LayAlign with the LLM alone reading a prompt as long as LayAlign's
whole sequence (`bench_generate.py`); the training step compares LayAlign with MindMerger mode (`bench_train.py`).
A decoding ratio is LayAlign's tokens per second over the LLM's (higher is better); a prefill or step ratio is
LayAlign's time over the baseline's (lower is better). The `arithmetic` column is each ratio as it would be if time
followed the multiply-adds each contender computes: a target beyond it cannot be reached by removing overhead, only
by removing arithmetic. `bench_breakdown.py` splits each difference into LayAlign's parts.
"""

import torch

from modeling_layalign.evaluation.cli_arguments import positive_int

import bench_generate
import bench_train
from bench_breakdown import multiply_adds, without_gradients
from common import argument_parser, autocast_for, build_models, describe_device, print_table, training_batch, write_json


# The targets, for the `demo` preset. Row -> (target, whether LayAlign's ratio must reach it from above
# (decoding speed) or stay below it (time)).
DEMO_TARGETS = {
    "decoding, batch 1, LayAlign / LLM alone": (0.95, "at least"),
    "decoding, batch 8, LayAlign / LLM alone": (0.95, "at least"),
    "prefill, batch 1, LayAlign / LLM alone": (1.15, "at most"),
    "prefill, batch 8, LayAlign / LLM alone": (1.15, "at most"),
    "training step, batch 8, LayAlign / MindMerger mode": (1.15, "at most"),
}


def one_run(models, repeats: int) -> dict[str, float]:
    """The five ratios of the table, measured once."""
    preset = models.preset
    ratios = {}
    for batch in (1, 8):
        measured = bench_generate.measure(models, batch, repeats)
        layalign, llm = measured["LayAlign"], measured["LLM alone"]
        ratios[f"decoding, batch {batch}, LayAlign / LLM alone"] = (
            layalign["decode_tokens_per_second"] / llm["decode_tokens_per_second"]
        )
        ratios[f"prefill, batch {batch}, LayAlign / LLM alone"] = layalign["prefill_seconds"] / llm["prefill_seconds"]
    step = bench_train.measure_stage(models, preset.stage1_text_len, 0, repeats)
    ratios[f"training step, batch {preset.train_batch}, LayAlign / MindMerger mode"] = (
        step["LayAlign"]["seconds"] / step["MindMerger mode"]["seconds"]
    )
    return ratios


def arithmetic_ratios(models) -> dict[str, float]:
    """Each ratio of the table as it would be if time followed multiply-adds (`FlopCounterMode`'s count of matrix
    products and attention): what the method's arithmetic alone allows at these shapes."""
    preset = models.preset
    settings = bench_generate.generation_settings(models.layalign.config.text_config, static_cache=False)
    generators = {"LayAlign": models.layalign, "LLM alone": models.llm}
    ratios = {}
    with without_gradients(models.layalign):
        for batch in (1, 8):
            inputs = bench_generate.generation_inputs(models, batch)
            macs = {
                (name, tokens): multiply_adds(lambda: bench_generate.generate(model, inputs[name], tokens, settings))
                for name, model in generators.items()
                for tokens in (1, preset.new_tokens)
            }
            decoding = {name: macs[name, preset.new_tokens] - macs[name, 1] for name in generators}
            ratios[f"decoding, batch {batch}, LayAlign / LLM alone"] = decoding["LLM alone"] / decoding["LayAlign"]
            ratios[f"prefill, batch {batch}, LayAlign / LLM alone"] = macs["LayAlign", 1] / macs["LLM alone", 1]
    batch = training_batch(models.layalign.config, preset.train_batch, preset.encoder_len, preset.stage1_text_len, preset.device)
    steps = {name: multiply_adds(step) for name, step in bench_train.step_functions(
        models, batch, autocast_for(preset.device, preset.dtype)
    ).items()}  # fmt: skip
    for model in (models.layalign, models.mindmerger):
        model.eval()
    ratios[f"training step, batch {preset.train_batch}, LayAlign / MindMerger mode"] = (
        steps["LayAlign"] / steps["MindMerger mode"]
    )
    return ratios


def meets(ratio: float, target: float, direction: str) -> bool:
    return ratio >= target if direction == "at least" else ratio <= target


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__, repeats=3)
    parser.add_argument("--threads", type=positive_int, default=2, help="CPU threads for every contender.")
    parser.add_argument("--runs", type=positive_int, default=2, help="Runs of the whole table, back to back.")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        models = build_models(args.preset)
        device = describe_device(models.preset.device)
        runs = [one_run(models, args.repeats) for _ in range(args.runs)]
        arithmetic = arithmetic_ratios(models)
    finally:
        torch.set_num_threads(threads)
    targets = DEMO_TARGETS if args.preset == "demo" else {}
    rows = []
    for name in runs[0]:
        ratios = [run[name] for run in runs]
        row = [name, *(f"{ratio:.2f}x" for ratio in ratios), f"{arithmetic[name]:.2f}x", "", ""]
        if name in targets:
            target, direction = targets[name]
            row[-2:] = [f"{direction} {target:.2f}x", "met" if all(meets(r, target, direction) for r in ratios) else "not met"]
        rows.append(row)
    print_table(
        f"Wall clock, preset {args.preset} ({device}, median of {args.repeats} per run)",
        ["", *(f"run {index + 1}" for index in range(args.runs)), "arithmetic", "target", ""],
        rows,
    )
    results = {"preset": args.preset, "device": device, "threads": args.threads, "runs": runs, "arithmetic": arithmetic}
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
