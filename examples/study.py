"""Does the source's content reach the LLM? Stage 1 at equal budget for LayAlign and its controls, on held-out pairs.

    python examples/study.py --output_dir outputs/study --max_steps 400            # every system, one after another
    python examples/study.py --output_dir outputs/study --systems mindmerger       # one system (run several at once)
    python examples/study.py --output_dir outputs/study --report                   # the tables of what has finished

Systems, each trained by `examples/train_layalign.py` with the `demo` preset's stage 1 (demo models, shipped
question pairs) for the same steps and batch size:

- `layalign`: the paper's model (every encoder layer but the last fused into every LLM layer, plus input mapping);
- `mindmerger`: input mapping only (`use_layer_fusion=False`);
- `last_layer`: LayAlign fusing the encoder's last layer only.

Every `--eval_every` steps the gap (held-out loss per English token with a shuffled source minus with the real
source) is measured on a few held-out pairs per language (the curve). At the end each system is scored on
`--eval_pairs` held-out pairs per language (lines no run trained on): loss with the real and a shuffled source, the
gap, chrF and number recall of greedy reconstructions, the collapse statistics; next to the LLM alone reading each
source inside a translation prompt.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from modeling_layalign import LayAlignForCausalLM, LayAlignProcessor
from modeling_layalign.data import held_out_lines, load_translation_pairs
from modeling_layalign.evaluation import alignment_scores, layalign_target_loss
from modeling_layalign.monitoring import mapping_statistics

import train_layalign


SYSTEMS = {
    "layalign": [],
    "mindmerger": ["--use_layer_fusion", "False"],
    "last_layer": ["--fused_encoder_layers", "12"],  # multilingual-e5-small has 12 layers; hidden state 12 is its output
}
HELD_OUT = 100  # the demo preset's held-out block: lines 750-849 of every language, in no training run


def held_out_pairs(language: str, count: int) -> tuple[list[str], list[str]]:
    pairs = load_translation_pairs([language], lines=held_out_lines(HELD_OUT))
    if count > len(pairs):
        raise ValueError(f"Only {len(pairs)} held-out pairs per language; `--eval_pairs` is {count}.")
    pairs = pairs.select(range(count))
    return pairs["source"], pairs["target"]


class GapCurve(TrainerCallback):
    """Every `every` steps (and before the first): the held-out gap per language on a few pairs, as JSON lines.

    Reads the held-out pairs with the run's own processor, which the Trainer hands over at the start of training.
    """

    def __init__(self, languages: list[str], pairs: int, every: int, path: Path):
        self.every, self.path = every, path
        self.pairs = {language: held_out_pairs(language, pairs) for language in languages}
        self.processor = None

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.processor = processing_class
        if state.global_step == 0:
            self.record(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.record(model, state.global_step)

    def record(self, model, step: int) -> None:
        was_training = model.training
        model.eval()
        point = {"step": step}
        for language, (sources, targets) in self.pairs.items():
            real = layalign_target_loss(model, self.processor, sources, targets)
            shuffled = layalign_target_loss(model, self.processor, sources[1:] + sources[:1], targets)
            point[language] = round(shuffled - real, 4)
        point.update({name: round(value, 4) for name, value in mapping_statistics(model, self.processor).items()})
        model.train(was_training)
        with self.path.open("a") as handle:
            handle.write(json.dumps(point) + "\n")


def train_system(name: str, args: argparse.Namespace) -> Path:
    """Stage 1 of one system with the demo preset; its gap curve lands in `<output_dir>/<name>/curve.jsonl`."""
    folder = Path(args.output_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "curve.jsonl").unlink(missing_ok=True)
    curve = GapCurve(args.languages, args.curve_pairs, args.eval_every, folder / "curve.jsonl")
    train_layalign.main(
        ["--preset", "demo", "--stage", "1", "--output_dir", str(folder), "--max_steps", str(args.max_steps),
         "--per_device_train_batch_size", str(args.batch_size), "--max_train_examples",
         str(args.max_steps * args.batch_size), "--logging_steps", str(args.eval_every), "--disable_tqdm", "True",
         *SYSTEMS[name], *args.train_args],
        callbacks=[curve],
    )  # fmt: skip
    return folder


def evaluate_system(folder: Path, args: argparse.Namespace) -> dict:
    """Final scores of a trained system on `--eval_pairs` held-out pairs per language, written to `results.json`."""
    model = LayAlignForCausalLM.from_pretrained(folder)
    processor = LayAlignProcessor.from_pretrained(folder)
    results = {"statistics": mapping_statistics(model, processor)}
    for language in args.languages:
        sources, targets = held_out_pairs(language, args.eval_pairs)
        with torch.no_grad():
            results[language] = alignment_scores(model, processor, sources, targets, args.generations)
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    return results


def report(output_dir: Path, languages: list[str]) -> None:
    """Prints the final table and the gap curve of every system that has results."""
    systems = {name: output_dir / name for name in SYSTEMS if (output_dir / name / "results.json").is_file()}
    print("\nHeld-out pairs: loss per English token (real / shuffled source), gap, chrF, number recall, distinct outputs")
    print("| system | lang | loss | shuffled | gap | chrF | numbers | distinct | source cosine | norm ratio | max gate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, folder in systems.items():
        results = json.loads((folder / "results.json").read_text())
        statistics = results["statistics"]
        for language in languages:
            row = results[language]
            numbers = "n/a" if row["number_recall"] is None else f"{row['number_recall']:.2f}"
            print(
                f"| {name} | {language} | {row['loss']:.3f} | {row['shuffled_loss']:.3f} | {row['gap']:+.3f} | "
                f"{row['chrf']:.1f} | {numbers} | {row['distinct_reconstructions']:.2f} | "
                f"{statistics.get('source_cosine', float('nan')):.3f} | {statistics.get('norm_ratio', float('nan')):.2f} | "
                f"{statistics.get('gate_max_abs', 0.0):.3f} |"
            )
    print("\nGap (shuffled minus real source, nats per English token) against training steps, mean over languages")
    curves = {}
    for name in SYSTEMS:
        path = output_dir / name / "curve.jsonl"
        if path.is_file():
            points = [json.loads(line) for line in path.read_text().splitlines()]
            curves[name] = {point["step"]: sum(point[language] for language in languages) / len(languages) for point in points}
    steps = sorted({step for curve in curves.values() for step in curve})
    print("| step | " + " | ".join(curves) + " |")
    print("|---|" + "---|" * len(curves))
    for step in steps:
        cells = [f"{curve[step]:+.3f}" if step in curve else "" for curve in curves.values()]
        print(f"| {step} | " + " | ".join(cells) + " |")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/study")
    parser.add_argument("--systems", nargs="+", choices=sorted(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--curve_pairs", type=int, default=16, help="Held-out pairs per language for each curve point.")
    parser.add_argument("--eval_pairs", type=int, default=64, help="Held-out pairs per language for the final scores.")
    parser.add_argument("--generations", type=int, default=16, help="Greedy reconstructions per language.")
    parser.add_argument("--languages", nargs="+", default=["ja", "zh", "ru"])
    parser.add_argument("--report", action="store_true", help="Only print the tables of finished systems.")
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="Passed on to train_layalign.py.")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    if not args.report:
        for name in args.systems:
            evaluate_system(train_system(name, args), args)
    report(Path(args.output_dir), args.languages)


if __name__ == "__main__":
    main()
