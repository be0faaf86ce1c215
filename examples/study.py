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
import shutil
from pathlib import Path

import torch
from layalign_demo import ENCODER_TEXT_PREFIX, prepare_demo_models
from peft import PeftModel
from transformers import AutoTokenizer, TrainerCallback
from transformers.utils import ADAPTER_CONFIG_NAME, CONFIG_NAME

from modeling_layalign import LayAlignForCausalLM, LayAlignProcessor
from modeling_layalign.evaluation.ladder import LADDER_LANGUAGES, answer_ladder, llm_rungs, load_mgsm_with_answers
from modeling_layalign.evaluation.scoring import alignment_scores, layalign_target_loss
from modeling_layalign.training.data import MATH_PROMPT, held_out_lines, load_translation_pairs
from modeling_layalign.training.monitoring import mapping_statistics

import train_layalign


SYSTEMS = {
    "layalign": [],
    "mindmerger": ["--use_layer_fusion", "False"],
    "last_layer": ["--fused_encoder_layers", "12"],  # multilingual-e5-small has 12 layers; hidden state 12 is its output
}
HELD_OUT = 100  # the demo preset's held-out block: lines 750-849 of every language, in no training run
REPOSITORY = Path(__file__).resolve().parent.parent
SHIPPED_STAGE_ONE = REPOSITORY / "checkpoints" / "demo-stage1"
STAGE_TWO_SYSTEMS = ("layalign", "mindmerger")
STAGE_TWO_INPUT_MAPPING = ("input_mapping.", "boundary.")


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


def stage_two_start(name: str, folder: Path, stage_one: Path = SHIPPED_STAGE_ONE, bases: tuple | None = None) -> Path:
    """The folder stage 2 of system `name` starts from (`--init_from`): the stage-1 checkpoint `stage_one` with a
    processor for the math task. `mindmerger` keeps its input mapping and boundary and drops the fusion and gates, so
    both systems start from the same input mapping. A LoRA that `stage_one` keeps as an adapter (`lora/`) is copied
    along, for stage 2 to train on (with `--lora_r`). `bases` (encoder, LLM folders) default to the demo models."""
    encoder_dir, llm_dir = (str(path) for path in (bases or prepare_demo_models()))
    model = LayAlignForCausalLM.from_pretrained(
        stage_one, encoder_name_or_path=encoder_dir, llm_name_or_path=llm_dir, load_lora=False
    )
    if name == "mindmerger":
        model.config.use_layer_fusion = False
        weights = {key: value for key, value in model.state_dict().items() if key.startswith(STAGE_TWO_INPUT_MAPPING)}
        model = LayAlignForCausalLM(model.config, encoder=model.encoder, llm=model.llm)
        model.load_layalign_state_dict(weights)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    processor = LayAlignProcessor(
        tokenizer=tokenizer,
        encoder_tokenizer=AutoTokenizer.from_pretrained(encoder_dir),
        encoder_text_prefix=ENCODER_TEXT_PREFIX,
        prompt_template=MATH_PROMPT,
    )
    start = folder / "start"
    model.save_pretrained(start)
    processor.save_pretrained(start)
    if (lora := train_layalign.kept_lora(stage_one)) is not None:
        shutil.copytree(lora, start / lora.name, dirs_exist_ok=True)
    return start


def train_stage_two(name: str, args: argparse.Namespace) -> Path:
    """Stage 2 of one system from the shipped stage 1, saving a checkpoint every `--eval_every` steps (the curve is
    measured on those afterwards, by `--ladder`)."""
    folder = Path(args.output_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    start = stage_two_start(name, folder, Path(args.stage_one), args.bases)
    train_layalign.main(
        ["--preset", "demo", "--stage", "2", "--init_from", str(start), "--output_dir", str(folder),
         "--max_steps", str(args.max_steps), "--per_device_train_batch_size", str(args.batch_size),
         "--max_train_examples", str(args.max_steps * args.batch_size), "--max_length", str(args.max_length),
         "--max_source_length", str(args.max_source_length), "--logging_steps", "10", "--save_strategy", "steps",
         "--save_steps", str(args.eval_every), "--disable_tqdm", "True", *args.train_args]
    )  # fmt: skip
    return folder


def stage_two_checkpoints(folder: Path, up_to: int | None = None) -> dict[int, Path]:
    """Step -> checkpoint of a stage-2 run, up to step `up_to` (default: all): its start (step 0), the Trainer's
    `checkpoint-N` folders and, once the run has finished, the final model."""
    checkpoints = {0: folder / "start"}
    checkpoints.update({int(path.name.split("-")[1]): path for path in folder.glob("checkpoint-*")})
    if (state := folder / "trainer_state.json").is_file():
        checkpoints[json.loads(state.read_text())["global_step"]] = folder
    return {step: path for step, path in sorted(checkpoints.items()) if up_to is None or step <= up_to}


def load_for_ladder(folder: Path, bases: tuple | None) -> tuple[LayAlignForCausalLM, LayAlignProcessor]:
    """A checkpoint and its processor, set to cut neither a source nor an answer.

    A LoRA run's Trainer checkpoint (`checkpoint-N`) is a peft adapter, the LoRA and the LayAlign modules' trained
    copies, over the run's start (`start/` beside it, without any LoRA it keeps: the adapter trained that one on): it
    is attached there and merged, as the run's final save merges it.
    """
    encoder_dir, llm_dir = (str(path) for path in (bases or prepare_demo_models()))
    if (folder / ADAPTER_CONFIG_NAME).is_file() and not (folder / CONFIG_NAME).is_file():
        start = LayAlignForCausalLM.from_pretrained(
            folder.parent / "start", encoder_name_or_path=encoder_dir, llm_name_or_path=llm_dir, load_lora=False
        )
        model = train_layalign.merge_lora(PeftModel.from_pretrained(start, folder))
    else:
        model = LayAlignForCausalLM.from_pretrained(folder, encoder_name_or_path=encoder_dir, llm_name_or_path=llm_dir)
    processor = LayAlignProcessor.from_pretrained(folder)
    processor.max_source_length, processor.max_length = 512, 4096
    return model, processor


def ladder_system(name: str, args: argparse.Namespace) -> dict:
    """The answer ladder of one trained stage-2 system on `--ladder_questions` MGSM questions per language, and its
    curve (share closed and gap per language at every saved checkpoint, on `--curve_questions`), to `ladder.json`."""
    folder = Path(args.output_dir) / name
    checkpoints = stage_two_checkpoints(folder, args.ladder_step)
    if not (folder / "start").is_dir() or not checkpoints:
        steps = sorted(stage_two_checkpoints(folder)) if (folder / "start").is_dir() else "none: train it first"
        raise SystemExit(f"`--ladder_step {args.ladder_step}`: {folder} has no checkpoint to measure (its steps: {steps}).")
    final_step = max(checkpoints)
    examples = load_mgsm_with_answers(args.ladder_languages, limit=args.ladder_questions, first=args.ladder_first_question)
    curve_examples = load_mgsm_with_answers(args.curve_languages, limit=args.curve_questions, first=args.ladder_first_question)
    model, processor = load_for_ladder(checkpoints[final_step], args.bases)
    llm_losses = llm_rungs(model.llm, processor.tokenizer, examples)
    curve_llm_losses = llm_rungs(model.llm, processor.tokenizer, curve_examples)
    results = {
        "step": final_step,
        "checkpoint": str(checkpoints[final_step]),
        "questions": args.ladder_questions,
        "first_question": args.ladder_first_question,
        "llm_alone": {
            language: dict(zip(("english", "llm", "english_shuffled"), losses)) for language, losses in llm_losses.items()
        },
        "final": {language: rung.to_dict() for language, rung in answer_ladder(model, processor, examples, llm_losses).items()},
        "curve_questions": args.curve_questions,
        "curve": [],
    }
    for step, checkpoint in checkpoints.items():
        if step % args.curve_every and step != final_step:
            continue
        model, processor = load_for_ladder(checkpoint, args.bases)
        ladder = answer_ladder(model, processor, curve_examples, curve_llm_losses)
        results["curve"].append({"step": step, **{language: rung.to_dict() for language, rung in ladder.items()}})
        (folder / "ladder.json").write_text(json.dumps(results, indent=2))
    return results


def ladder_report(output_dir: Path, languages: list[str], curve_languages: list[str]) -> None:
    """Prints the ladder table (LLM alone, then each system) and the share-closed curve of every laddered system."""
    systems = {name: json.loads(path.read_text()) for name in STAGE_TWO_SYSTEMS if (path := output_dir / name / "ladder.json").is_file()}
    if not systems:
        raise SystemExit(
            f"No laddered stage-2 system in {output_dir}: train them (`--stage 2`) and measure them (`--ladder`) first."
        )
    print("\nAnswer loss per token on MGSM questions with GSM8K's English chains of thought: (a) LLM alone, English "
          "question; (b) LLM alone, question in L; (c) the system, question in L as source and prompt; (d) the same "
          "with another question's source; (e) LLM alone, another English question; gap d - c; share closed "
          "(b - c) / (b - a); a source-blind share (b - d) / (b - a); content share (d - c) / (e - a)")
    print("| system | lang | a: LLM, English | b: LLM, in L | c: real source | d: shuffled source | e: LLM, another "
          "English question | gap d - c | share closed | share, shuffled | content share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    alone = next(iter(systems.values()))["llm_alone"]
    for language in languages:
        row = alone[language]
        print(f"| LLM alone | {language} | {row['english']:.3f} | {row['llm']:.3f} | - | - | "
              f"{_number(row.get('english_shuffled'), '.3f')} | - | 0% | - | - |")
    for name, results in systems.items():
        for language in languages:
            row = results["final"][language]
            print(
                f"| {name} | {language} | {row['english']:.3f} | {row['llm']:.3f} | {row['layalign']:.3f} | "
                f"{row['shuffled']:.3f} | {_number(row.get('english_shuffled'), '.3f')} | {row['gap']:+.3f} | "
                f"{row['share_closed']:.0%} | {row['share_closed_shuffled']:.0%} | {_number(row.get('content_share'), '.0%')} |"
            )
    print("\nMean over " + ", ".join(curve_languages) + ", against steps: share of the language gap closed, gap d - c, "
          "content share")
    print("| step | " + " | ".join(f"{name}: share | {name}: gap | {name}: content" for name in systems) + " |")
    print("|---|" + "---|---|---|" * len(systems))
    curves = {name: {point["step"]: point for point in results["curve"]} for name, results in systems.items()}
    for step in sorted({step for curve in curves.values() for step in curve}):
        cells = []
        for curve in curves.values():
            point = curve.get(step)
            if point is None:
                cells += ["", "", ""]
                continue
            means = {key: _mean(point, curve_languages, key) for key in ("share_closed", "gap", "content_share")}
            cells += [_number(means["share_closed"], ".0%"), _number(means["gap"], "+.3f"), _number(means["content_share"], ".0%")]
        print(f"| {step} | " + " | ".join(cells) + " |")


def _mean(point: dict, languages: list[str], key: str) -> float | None:
    """The mean of `key` over `languages` in one curve point; None where a ladder measured before the key existed."""
    values = [point[language].get(key) for language in languages]
    return None if None in values else sum(values) / len(values)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


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
    if not systems:
        raise SystemExit(f"No finished stage-1 system in {output_dir}: run the study without `--report` first.")
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
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1, help="2: the task stage, from the shipped stage 1.")
    parser.add_argument("--systems", nargs="+", choices=sorted(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=320, help="Stage 2: longest LLM text (prompt and answer).")
    parser.add_argument("--max_source_length", type=int, default=128, help="Stage 2: longest source, encoder tokens.")
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--curve_pairs", type=int, default=16, help="Held-out pairs per language for each curve point.")
    parser.add_argument("--eval_pairs", type=int, default=64, help="Held-out pairs per language for the final scores.")
    parser.add_argument("--generations", type=int, default=16, help="Greedy reconstructions per language.")
    parser.add_argument("--languages", nargs="+", default=["ja", "zh", "ru"])
    parser.add_argument("--report", action="store_true", help="Only print the tables of finished systems.")
    parser.add_argument("--stage_one", default=str(SHIPPED_STAGE_ONE), help="Stage 2: the stage-1 checkpoint to start from.")
    parser.add_argument("--ladder", action="store_true", help="Stage 2: measure the answer ladder of trained systems.")
    parser.add_argument("--ladder_languages", nargs="+", default=list(LADDER_LANGUAGES))
    parser.add_argument("--ladder_questions", type=int, default=16, help="MGSM questions per language for the ladder.")
    parser.add_argument(
        "--ladder_first_question", type=int, default=0,
        help="The ladder's first MGSM line: 24 measures on questions that a ladder of the first 24 never read.",
    )  # fmt: skip
    parser.add_argument("--curve_languages", nargs="+", default=["sw", "bn", "th", "te", "ja", "zh", "ru"])
    parser.add_argument("--curve_questions", type=int, default=8, help="MGSM questions per language per curve point.")
    parser.add_argument("--curve_every", type=int, default=40, help="Stage 2: steps between curve points.")
    parser.add_argument("--ladder_step", type=int, help="Stage 2: measure the checkpoint of this step (default: the end).")
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="Passed on to train_layalign.py.")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    args.bases = None
    if args.stage == 2:
        for name in args.systems:
            if args.ladder:
                ladder_system(name, args)
            elif not args.report:
                train_stage_two(name, args)
        if args.ladder or args.report:
            ladder_report(Path(args.output_dir), args.ladder_languages, args.curve_languages)
        return
    if not args.report:
        for name in args.systems:
            evaluate_system(train_system(name, args), args)
    report(Path(args.output_dir), args.languages)


if __name__ == "__main__":
    main()
