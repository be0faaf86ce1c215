"""Stage-1 training speed on the demo models on a CPU: float32 against bf16 autocast and length-grouped batches.

    python benchmarks/bench_cpu_training.py --steps 12

Every configuration is the same `examples/train_layalign.py` run (demo preset, stage 1, same seed, no warm start),
timed by the Trainer in this process, one after the other; each logs every step (with the collapse monitor's
statistics, the same small cost in each). The LayAlign weights stay float32 under autocast. The loss of each
logged step is printed next to float32's so that bf16 noise is visible; length grouping changes the batches, so
its losses are not comparable step by step.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path


REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "examples"))

import train_layalign  # noqa: E402


CONFIGURATIONS = {
    "float32": ["--bf16", "False"],  # the demo preset turns bf16 on
    "bf16 autocast": ["--bf16", "True"],
    "bf16 autocast + group_by_length": ["--bf16", "True", "--train_sampling_strategy", "group_by_length"],
}


def run(name: str, extra: list[str], steps: int, batch_size: int, output_dir: Path) -> dict:
    trainer = train_layalign.main(
        ["--preset", "demo", "--stage", "1", "--output_dir", str(output_dir / name.replace(" ", "_")),
         "--max_steps", str(steps), "--per_device_train_batch_size", str(batch_size), "--logging_steps", "1",
         "--max_train_examples", str(steps * batch_size * 4), "--warm_start_sentences", "0",
         "--save_strategy", "no", "--disable_tqdm", "True", *extra]
    )  # fmt: skip
    history = trainer.state.log_history
    return {
        "examples_per_second": history[-1]["train_samples_per_second"],
        "losses": [entry["loss"] for entry in history if "loss" in entry],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--json", help="Also write the results to this file.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as output_dir:
        results = {name: run(name, extra, args.steps, args.batch_size, Path(output_dir)) for name, extra in CONFIGURATIONS.items()}
    baseline = results["float32"]
    print(f"\nStage 1 on the demo models, {args.steps} steps of {args.batch_size}, one process")
    print("| configuration | examples/s | vs float32 | max |loss - float32 loss| per step |")
    print("|---|---|---|---|")
    for name, result in results.items():
        comparable = "group_by_length" not in name
        difference = max(abs(a - b) for a, b in zip(result["losses"], baseline["losses"])) if comparable else None
        shown = f"{difference:.4f}" if difference is not None else "n/a (other batches)"
        ratio = result["examples_per_second"] / baseline["examples_per_second"]
        print(f"| {name} | {result['examples_per_second']:.2f} | {ratio:.2f}x | {shown} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
