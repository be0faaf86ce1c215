"""Generation throughput of LayAlign served by vLLM (`layalign_vllm/`) against our `generate`, on the demo models.

    python benchmarks/bench_vllm.py                          # from .venv; vLLM runs in .venv-vllm
    python benchmarks/bench_vllm.py --llm_alone              # and the control: the LLM alone through both
    python benchmarks/bench_vllm.py --compiled               # vLLM's engines compiled (its default), not eager
    python benchmarks/bench_vllm.py --batches 1 8 --new_tokens 16 --json results/vllm.json

The shipped `checkpoints/demo-stage2` (LayAlign-only) over the demo models (multilingual-e5-small, SmolLM2-135M-
Instruct, float32; `layalign_demo.prepare_demo_models`). The requests are the first MGSM questions of every
language in turn (source and, through the checkpoint's math template, prompt), tokenized once here so that both
sides read the same token ids. Each side decodes exactly `--new_tokens` tokens per request, end-of-sequence
ignored (`min_new_tokens` / `ignore_eos=True`), greedy: tokens per second is `batch * new_tokens` over the time of
the whole call (encoder, prefill and decoding). Our `generate` gets one left-padded batch; vLLM gets the same
requests at once and batches them itself (continuous batching, no padding). Each side runs an untimed batch first.
Each batch is also timed with one new token (the encoder and prefill: `first token`); `decoding` is the remaining
`batch * (new_tokens - 1)` tokens over the difference of the two times.

Both sides run on one core: vLLM's CPU worker binds one (it reserves the other on a 2-core machine), and `generate`
gets `torch.set_num_threads(--threads)`. `generate` runs first in this process; then this script runs itself under
`--vllm_side` in the serving environment (`LAYALIGN_VLLM_PYTHON`, default `.venv-vllm/bin/python`; `bash
scripts/install_vllm.sh` makes it), which starts one engine (20-45 s, not timed) and times every batch size. The
table's ratio is vLLM's tokens per second over `generate`'s, measured in the same run. `--llm_alone` adds the same
measurements for the LLM alone (its own `generate`, and a vLLM engine on the LLM base, prefix caching off on both
engines), on prompts as long as LayAlign's whole sequences: what vLLM gains on this machine without the plugin.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "checkpoints" / "demo-stage2"
SERVING_PYTHON = Path(os.environ.get("LAYALIGN_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
# vLLM's KV cache: room for every request's self- and cross-attention cache.
KV_CACHE_GIB = "2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="Batch sizes to time.")
    parser.add_argument("--new_tokens", type=int, default=32, help="Tokens decoded per request.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of `generate` (vLLM binds one core).")
    parser.add_argument(
        "--llm_alone", action="store_true",
        help="Also time the control: the LLM alone, through vLLM and through its generate, on prompts as long as "
        "LayAlign's whole sequences (what vLLM gains on this machine without the plugin).",
    )  # fmt: skip
    parser.add_argument(
        "--compiled", action="store_true",
        help="Run vLLM's engines with its default compilation (torch.compile) instead of eager (`enforce_eager`).",
    )  # fmt: skip
    parser.add_argument("--json", help="Also write the results to this file.")
    parser.add_argument("--vllm_side", nargs=2, metavar=("SPEC", "RESULTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new_tokens must be at least 2 (one for the first token, the rest decoded), got {args.new_tokens}.")
    return args


def demo_requests(count: int) -> tuple[list[dict], object, object]:
    """`count` requests (`{"source": encoder ids, "prompt": LLM ids}`), the first MGSM question of each language in
    turn, and the model and processor they were made with."""
    import torch

    from layalign_demo import prepare_demo_models
    from modeling_layalign import LayAlignForCausalLM, LayAlignProcessor

    encoder_dir, llm_dir = prepare_demo_models()
    bases = {"encoder_name_or_path": str(encoder_dir), "llm_name_or_path": str(llm_dir)}
    model = LayAlignForCausalLM.from_pretrained(CHECKPOINT, dtype=torch.float32, **bases).eval()
    processor = LayAlignProcessor.from_pretrained(CHECKPOINT, **bases)
    files = sorted((REPO / "data" / "mgsm").glob("mgsm_*.tsv"))
    questions = [file.read_text().splitlines()[0].split("\t")[0] for file in files]
    examples = [processor.encode_example(questions[index % len(questions)]) for index in range(count)]
    requests = [{"source": e["encoder_input_ids"], "prompt": e["input_ids"]} for e in examples]
    return requests, model, processor


def time_calls(call, batches: list[int], new_tokens: int) -> dict:
    """Times `call(batch, tokens)` (one greedy call on the first `batch` requests, `tokens` new tokens each) per
    batch size, with `new_tokens` and with one token, after one untimed call:
    `{"seconds": {batch: s}, "first_token_seconds": {batch: s}}`."""
    call(1, new_tokens)  # untimed

    def seconds(batch: int, tokens: int) -> float:
        start = time.perf_counter()
        call(batch, tokens)
        return time.perf_counter() - start

    return {
        "seconds": {batch: seconds(batch, new_tokens) for batch in batches},
        "first_token_seconds": {batch: seconds(batch, 1) for batch in batches},
    }


def llm_alone_prompts(requests: list[dict]) -> list[list[int]]:
    """The control's prompts: for each request, LLM token ids as long as the whole sequence LayAlign's LLM reads
    (BOS, one position per source token, the boundary, the prompt), the prompt's ids repeated."""
    return [(r["prompt"] * (len(r["source"]) + 3))[: len(r["source"]) + 2 + len(r["prompt"])] for r in requests]


def time_generate(model, processor, requests: list[dict], args: argparse.Namespace) -> dict:
    """`time_calls` of our `generate` on left-padded batches of the first requests; with `--llm_alone`, also of
    the LLM's own `generate` on the control's prompts (under `"llm_alone"`)."""
    import torch

    def layalign(batch: int, tokens: int) -> None:
        examples = [{"input_ids": r["prompt"], "encoder_input_ids": r["source"]} for r in requests[:batch]]
        with torch.no_grad():
            model.generate(
                **processor.pad(examples, padding_side="left"), max_new_tokens=tokens, min_new_tokens=tokens,
                do_sample=False,
            )  # fmt: skip

    timings = time_calls(layalign, args.batches, args.new_tokens)
    if args.llm_alone:
        prompts = llm_alone_prompts(requests)

        def llm_alone(batch: int, tokens: int) -> None:
            inputs = processor.tokenizer.pad({"input_ids": prompts[:batch]}, padding_side="left", return_tensors="pt")
            with torch.no_grad():
                model.llm.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

        timings["llm_alone"] = time_calls(llm_alone, args.batches, args.new_tokens)
    return timings


def time_vllm(spec: dict) -> dict:
    """In the serving environment: `time_calls` of one engine on the LayAlign checkpoint (started untimed), and
    with `"llm_alone"` in the spec, of a second engine on the LLM alone with the control's prompts."""
    from vllm import LLM, SamplingParams

    def engine(model: str, **kwargs) -> LLM:
        # The longest sequence vLLM holds: [BOS, one placeholder per source token, boundary], the prompt, the new
        # tokens. A step has room for every request's whole prompt (encoder-decoder models: no chunked prefill).
        # No prefix caching, which encoder-decoder models do not get: the control would read its repeated prompts
        # from the cache.
        longest = max(len(r["source"]) + len(r["prompt"]) for r in spec["requests"]) + 2 + spec["new_tokens"]
        return LLM(
            model=model, dtype="float32", enforce_eager=not spec["compiled"], max_model_len=longest,
            max_num_seqs=max(spec["batches"]), max_num_batched_tokens=longest * max(spec["batches"]), seed=0,
            enable_prefix_caching=False, **kwargs,
        )  # fmt: skip

    def timed(llm: LLM, prompts: list[dict]) -> dict:
        def call(batch: int, tokens: int) -> None:
            params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
            outputs = llm.generate(prompts[:batch], params, use_tqdm=False)
            assert all(len(output.outputs[0].token_ids) == tokens for output in outputs)

        timings = time_calls(call, spec["batches"], spec["new_tokens"])
        llm.llm_engine.engine_core.shutdown()
        return timings

    start = time.perf_counter()
    llm = engine(spec["model"], hf_overrides=spec["hf_overrides"])
    startup = time.perf_counter() - start
    prompts = [{"prompt_token_ids": r["prompt"], "multi_modal_data": {"source": r["source"]}} for r in spec["requests"]]
    timings = {"startup_seconds": startup, **timed(llm, prompts)}
    del llm
    if spec["llm_alone"]:
        prompts = [{"prompt_token_ids": ids} for ids in llm_alone_prompts(spec["requests"])]
        timings["llm_alone"] = timed(engine(spec["hf_overrides"]["llm_name_or_path"]), prompts)
    return timings


def run_vllm_side(requests: list[dict], args: argparse.Namespace, bases: dict) -> dict:
    if not SERVING_PYTHON.is_file():
        sys.exit(f"No vLLM serving environment at {SERVING_PYTHON}: run `bash scripts/install_vllm.sh`.")
    spec = {"model": str(CHECKPOINT), "hf_overrides": bases, "requests": requests, "batches": args.batches,
            "new_tokens": args.new_tokens, "llm_alone": args.llm_alone, "compiled": args.compiled}  # fmt: skip
    environment = {
        **os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB,
        "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        spec_path, results_path = Path(folder) / "spec.json", Path(folder) / "results.json"
        spec_path.write_text(json.dumps(spec))
        run = subprocess.run(
            [str(SERVING_PYTHON), __file__, "--vllm_side", str(spec_path), str(results_path)],
            env=environment, cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode != 0:
            sys.exit(f"The vLLM side failed:\n{run.stderr[-6000:]}")
        results = json.loads(results_path.read_text())
    for timings in (results, results.get("llm_alone", {})):
        for key in ("seconds", "first_token_seconds"):
            if key in timings:
                timings[key] = {int(batch): seconds for batch, seconds in timings[key].items()}
    return results


def rates(timing: dict, batch: int, new_tokens: int) -> dict:
    """Tokens per second of the whole call, seconds to the first token, and tokens per second after it."""
    whole, first = timing["seconds"][batch], timing["first_token_seconds"][batch]
    return {
        "tokens_per_second": batch * new_tokens / whole,
        "first_token_seconds": first,
        "decoding_tokens_per_second": batch * (new_tokens - 1) / (whole - first),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.vllm_side:
        spec_path, results_path = args.vllm_side
        Path(results_path).write_text(json.dumps(time_vllm(json.loads(Path(spec_path).read_text()))))
        return {}

    import torch

    torch.set_num_threads(args.threads)
    requests, model, processor = demo_requests(max(args.batches))
    bases = {name: getattr(model.config, name) for name in ("encoder_name_or_path", "llm_name_or_path")}
    reference = time_generate(model, processor, requests, args)
    del model
    served = run_vllm_side(requests, args, bases)

    contenders = [("LayAlign", reference, served)]
    if args.llm_alone:
        contenders.append(("LLM alone (control)", reference["llm_alone"], served["llm_alone"]))
    rows = []
    results = {"new_tokens": args.new_tokens, "threads": args.threads, "compiled": args.compiled, "batches": {}}
    for name, ours, theirs in contenders:
        for batch in args.batches:
            sides = {"generate": rates(ours, batch, args.new_tokens), "vllm": rates(theirs, batch, args.new_tokens)}
            results["batches"].setdefault(batch, {})[name] = sides
            a, b = sides["generate"], sides["vllm"]
            rows.append([
                name, str(batch), f"{a['tokens_per_second']:.1f}", f"{b['tokens_per_second']:.1f}",
                f"{b['tokens_per_second'] / a['tokens_per_second']:.2f}x",
                f"{a['first_token_seconds']:.2f} / {b['first_token_seconds']:.2f}",
                f"{a['decoding_tokens_per_second']:.1f} / {b['decoding_tokens_per_second']:.1f}",
            ])  # fmt: skip
    results["vllm_startup_seconds"] = served["startup_seconds"]
    source_lengths = [len(r["source"]) for r in requests]
    prompt_lengths = [len(r["prompt"]) for r in requests]
    print(
        f"\nLayAlign demo-stage2 (multilingual-e5-small + SmolLM2-135M-Instruct, float32), {args.new_tokens} new "
        f"tokens per request, one core each; sources of {min(source_lengths)}-{max(source_lengths)} encoder tokens, "
        f"prompts of {min(prompt_lengths)}-{max(prompt_lengths)} tokens; vLLM "
        f"{'compiled' if args.compiled else 'eager'}, engine start {served['startup_seconds']:.0f} s (not timed)"
    )
    print("| model | batch | generate tokens/s | vLLM tokens/s | vLLM / generate | first token, s: generate / vLLM "
          "| decoding tokens/s: generate / vLLM |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
