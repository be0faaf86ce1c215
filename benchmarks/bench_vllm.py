"""Generation throughput of LayAlign served by vLLM (`layalign_vllm/`) against our `generate`, on the demo models.

    python benchmarks/bench_vllm.py                          # from .venv; vLLM runs in .venv-vllm
    python benchmarks/bench_vllm.py --batches 1 8 --new_tokens 16 --json results/vllm.json

The shipped `checkpoints/demo-stage2` (LayAlign-only) over the demo models (multilingual-e5-small, SmolLM2-135M-
Instruct, float32; `layalign_demo.prepare_demo_models`). The requests are the first MGSM questions of every
language in turn (source and, through the checkpoint's math template, prompt), tokenized once here so that both
sides read the same token ids. Each side decodes exactly `--new_tokens` tokens per request, end-of-sequence
ignored (`min_new_tokens` / `ignore_eos=True`), greedy: tokens per second is `batch * new_tokens` over the time of
the whole call (encoder, prefill and decoding). Our `generate` gets one left-padded batch; vLLM gets the same
requests at once and batches them itself (continuous batching, no padding). Each side runs an untimed batch first.

Both sides run on one core: vLLM's CPU worker binds one (it reserves the other on a 2-core machine), and `generate`
gets `torch.set_num_threads(--threads)`. `generate` runs first in this process; then this script runs itself under
`--vllm_side` in the serving environment (`LAYALIGN_VLLM_PYTHON`, default `.venv-vllm/bin/python`; `bash
scripts/install_vllm.sh` makes it), which starts one engine (20-45 s, not timed) and times every batch size. The
table's ratio is vLLM's tokens per second over `generate`'s, measured in the same run.
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
# vLLM's engine settings: room for the longest batch's prompts in one step (encoder-decoder models get no chunked
# prefill), and for every request's self- and cross-attention cache.
MAX_MODEL_LEN = 512
KV_CACHE_GIB = "2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="Batch sizes to time.")
    parser.add_argument("--new_tokens", type=int, default=32, help="Tokens decoded per request.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of `generate` (vLLM binds one core).")
    parser.add_argument("--json", help="Also write the results to this file.")
    parser.add_argument("--vllm_side", nargs=2, metavar=("SPEC", "RESULTS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


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


def time_generate(model, processor, requests: list[dict], batches: list[int], new_tokens: int) -> dict[int, float]:
    """Seconds of one greedy `generate` call per batch size, on left-padded batches of the first requests."""
    import torch

    def run(batch: int) -> float:
        examples = [{"input_ids": r["prompt"], "encoder_input_ids": r["source"]} for r in requests[:batch]]
        inputs = processor.pad(examples, padding_side="left")
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return time.perf_counter() - start

    run(1)  # untimed
    return {batch: run(batch) for batch in batches}


def time_vllm(spec: dict) -> dict:
    """In the serving environment: one engine, one untimed request, then seconds per batch size."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=spec["model"], hf_overrides=spec["hf_overrides"], dtype="float32", enforce_eager=True,
        max_model_len=MAX_MODEL_LEN, max_num_seqs=max(spec["batches"]),
        max_num_batched_tokens=MAX_MODEL_LEN * max(spec["batches"]), seed=0,
    )  # fmt: skip
    startup = time.perf_counter() - start
    n = spec["new_tokens"]
    params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
    prompts = [{"prompt_token_ids": r["prompt"], "multi_modal_data": {"source": r["source"]}} for r in spec["requests"]]

    def run(batch: int) -> float:
        start = time.perf_counter()
        outputs = llm.generate(prompts[:batch], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        assert all(len(output.outputs[0].token_ids) == n for output in outputs)
        return seconds

    run(1)  # untimed
    seconds = {batch: run(batch) for batch in spec["batches"]}
    llm.llm_engine.engine_core.shutdown()
    return {"startup_seconds": startup, "seconds": seconds}


def run_vllm_side(requests: list[dict], args: argparse.Namespace, bases: dict) -> dict:
    if not SERVING_PYTHON.is_file():
        sys.exit(f"No vLLM serving environment at {SERVING_PYTHON}: run `bash scripts/install_vllm.sh`.")
    spec = {"model": str(CHECKPOINT), "hf_overrides": bases, "requests": requests, "batches": args.batches,
            "new_tokens": args.new_tokens}  # fmt: skip
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
    results["seconds"] = {int(batch): seconds for batch, seconds in results["seconds"].items()}
    return results


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
    reference = time_generate(model, processor, requests, args.batches, args.new_tokens)
    del model
    served = run_vllm_side(requests, args, bases)

    rows, results = [], {"new_tokens": args.new_tokens, "threads": args.threads, "batches": {}}
    for batch in args.batches:
        tokens = batch * args.new_tokens
        ours, theirs = tokens / reference[batch], tokens / served["seconds"][batch]
        results["batches"][batch] = {"generate_tokens_per_second": ours, "vllm_tokens_per_second": theirs}
        rows.append([str(batch), f"{ours:.1f}", f"{theirs:.1f}", f"{theirs / ours:.2f}x"])
    results["vllm_startup_seconds"] = served["startup_seconds"]
    source_lengths = [len(r["source"]) for r in requests]
    prompt_lengths = [len(r["prompt"]) for r in requests]
    print(
        f"\nLayAlign demo-stage2 (multilingual-e5-small + SmolLM2-135M-Instruct, float32), {args.new_tokens} new "
        f"tokens per request, one core each; sources of {min(source_lengths)}-{max(source_lengths)} encoder tokens, "
        f"prompts of {min(prompt_lengths)}-{max(prompt_lengths)} tokens; vLLM engine start "
        f"{served['startup_seconds']:.0f} s (not timed)"
    )
    print("| batch | generate tokens/s | vLLM tokens/s | vLLM / generate |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
