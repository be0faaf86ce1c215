"""Generation speed of LayAlign against MindMerger mode and the LLM alone reading an equally long prompt.

    python benchmarks/bench_generate.py --preset demo
    python benchmarks/bench_generate.py --preset paper --json results/generate.json     # one GPU

Greedy decoding of exactly `new_tokens` tokens (end-of-sequence suppressed) after a prompt. LayAlign and MindMerger
mode read `encoder_len` source tokens and a `prompt_len`-token prompt, so the LLM reads `1 + encoder_len + 1 +
prompt_len` positions before the first new token; the LLM alone reads a prompt of that length. Prefill is the time
of `generate` with one new token (for LayAlign: the encoder, the fusion, the k/v projections and the LLM's first
pass; "of which encode" times `model.encode` alone, the part the LLM alone never runs); decode speed is `batch *
(new_tokens - 1)` over the time the remaining tokens add.

`--static_cache` gives every contender a static cache, with which `generate` compiles the decoding step
(`torch.compile`, CUDA graphs on a GPU; the benchmark asks for it on a CPU too). The untimed first round compiles.
"""


import torch
from transformers import CompileConfig

from modeling_layalign.evaluation.cli_arguments import positive_int

from common import (
    Models,
    argument_parser,
    build_models,
    describe_device,
    format_memory,
    interleaved_median_seconds,
    peak_memory_gib,
    print_profile,
    print_table,
    random_ids,
    write_json,
)


def generation_inputs(models: Models, batch: int) -> dict[str, dict]:
    preset, config = models.preset, models.layalign.config
    source = {
        "encoder_input_ids": random_ids(batch, preset.encoder_len, config.encoder_config.vocab_size, preset.device),
        "input_ids": random_ids(batch, preset.prompt_len, config.text_config.vocab_size, preset.device),
    }
    source["attention_mask"] = torch.ones_like(source["input_ids"])
    llm_prompt = random_ids(
        batch, models.layalign.num_prefix_positions(preset.encoder_len) + preset.prompt_len,
        config.text_config.vocab_size, preset.device,
    )  # fmt: skip
    return {
        "LayAlign": source,
        "MindMerger mode": source,
        "LLM alone": {"input_ids": llm_prompt, "attention_mask": torch.ones_like(llm_prompt)},
    }


def measure(models: Models, batch: int, repeats: int, profile: bool = False, static_cache: bool = False) -> dict[str, dict]:
    preset = models.preset
    generators = {"LayAlign": models.layalign, "MindMerger mode": models.mindmerger, "LLM alone": models.llm}
    settings = generation_settings(models.layalign.config.text_config, static_cache)
    calls = {}
    all_inputs = generation_inputs(models, batch)
    for name, inputs in all_inputs.items():
        model = generators[name]
        for new_tokens in (1, preset.new_tokens):
            calls[name, new_tokens] = lambda model=model, inputs=inputs, new_tokens=new_tokens: generate(
                model, inputs, new_tokens, settings
            )
    source = all_inputs["LayAlign"]
    for name in ("LayAlign", "MindMerger mode"):
        calls[name, "encode"] = lambda model=generators[name]: encode(model, source)
    medians = interleaved_median_seconds(calls, preset.device, repeats)
    if profile:
        for name in generators:
            model, inputs = generators[name], all_inputs[name]
            print_profile(
                f"generate, {name}, batch {batch}, 8 new tokens",
                lambda: generate(model, inputs, 8, settings),
                preset.device,
            )
    results = {}
    for name in generators:
        prefill, whole = medians[name, 1], medians[name, preset.new_tokens]
        results[name] = {
            "prefill_seconds": prefill,
            "encode_seconds": medians.get((name, "encode")),
            "generate_seconds": whole,
            "decode_tokens_per_second": batch * (preset.new_tokens - 1) / (whole - prefill),
            "peak_memory_gib": peak_memory_gib(calls[name, preset.new_tokens], preset.device),
        }
    return results


def encode(model, source: dict) -> None:
    with torch.no_grad():
        model.encode(source["encoder_input_ids"])


def generation_settings(text_config, static_cache: bool) -> dict:
    """Greedy decoding with end-of-sequence suppressed (`min_new_tokens`); with `static_cache`, compiled decoding."""
    settings = dict(do_sample=False, pad_token_id=text_config.pad_token_id, eos_token_id=text_config.eos_token_id)
    if static_cache:
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # `generate` compiles on accelerators only, unless told so
        settings.update(cache_implementation="static", compile_config=compile_config)
    return settings


def generate(model, inputs: dict, new_tokens: int, settings: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__, repeats=3, profile_help="Also profile generation at the smallest batch.")
    parser.add_argument("--static_cache", action="store_true", help="Static caches and compiled decoding steps.")
    parser.add_argument("--batches", type=positive_int, nargs="+", help="Batch sizes, instead of the preset's.")
    args = parser.parse_args(argv)
    models = build_models(args.preset)
    preset = models.preset
    batches = args.batches or preset.decode_batches
    cache = "static cache, compiled steps" if args.static_cache else "dynamic cache"
    results = {"preset": args.preset, "device": describe_device(preset.device), "dtype": str(preset.dtype), "cache": cache}
    for batch in batches:
        measured = measure(models, batch, args.repeats, args.profile and batch == min(batches), args.static_cache)
        results[f"batch {batch}"] = measured
        base = measured["LLM alone"]
        rows = [
            [
                name,
                f"{entry['decode_tokens_per_second']:.1f}",
                f"{entry['decode_tokens_per_second'] / base['decode_tokens_per_second']:.2f}x",
                f"{entry['prefill_seconds'] * 1000:.1f}",
                f"{entry['prefill_seconds'] / base['prefill_seconds']:.2f}x",
                "" if entry["encode_seconds"] is None else f"{entry['encode_seconds'] * 1000:.1f}",
                format_memory(entry["peak_memory_gib"]),
            ]
            for name, entry in measured.items()
        ]
        print_table(
            f"generation, preset {args.preset} ({results['device']}, {preset.dtype}, {cache}): batch {batch}, "
            f"{preset.encoder_len} encoder + {preset.prompt_len} prompt tokens, {preset.new_tokens} new tokens, "
            f"median of {args.repeats}",
            ["", "decode tok/s", "vs LLM alone", "prefill ms", "vs LLM alone", "of which encode ms", "peak GiB"],
            rows,
        )
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
