"""One training step of LayAlign against MindMerger mode and the LLM alone, at the same shapes.

    python benchmarks/bench_train.py --preset demo
    python benchmarks/bench_train.py --preset paper --json results/train.json     # one GPU

A step is forward + backward + optimizer (AdamW over the LayAlign modules, the bases frozen). Stage 1 reads a source
sentence and predicts its English translation (every text token is a target); stage 2 reads a source question and
predicts the answer after a prompt (the last half of the text is the target). The LLM-alone baseline is the LLM's
forward and backward to its input embeddings over a sequence as long as LayAlign's (`[BOS, mapped, boundary,
text]`): the least any method that trains modules in front of a frozen LLM must do. Under bfloat16 the LayAlign
modules stay float32 and the step runs under autocast. `--compile` runs each contender through `torch.compile`
(what `--torch_compile` does in the training script); the untimed warm-up rounds compile.
"""


from collections.abc import Callable

import torch

from common import (
    Models,
    argument_parser,
    autocast_for,
    build_models,
    describe_device,
    format_memory,
    interleaved_median_seconds,
    peak_memory_gib,
    print_profile,
    print_table,
    training_batch,
    write_json,
)


def layalign_step(model, batch: dict, optimizer: torch.optim.Optimizer, autocast) -> None:
    with autocast():
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def llm_step(llm, embeds: torch.Tensor, labels: torch.Tensor, autocast) -> None:
    embeds = embeds.detach().requires_grad_(True)
    with autocast():
        loss = llm(inputs_embeds=embeds, labels=labels).loss
    loss.backward()


def step_functions(
    models: Models, batch: dict, autocast, wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model
) -> dict[str, Callable[[], None]]:
    """One training step each of LayAlign and MindMerger mode on `batch` (AdamW over the trainable parameters, lr
    1e-5), both models left in train mode; `wrap` (e.g. `torch.compile`) applies to the model a step calls."""
    steps = {}
    for name, model in (("LayAlign", models.layalign), ("MindMerger mode", models.mindmerger)):
        model.train()
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        steps[name] = lambda model=wrap(model), optimizer=optimizer: layalign_step(model, batch, optimizer, autocast)
    return steps


def measure_stage(
    models: Models, text_len: int, target_from: int, repeats: int, profile: bool = False, compile: bool = False
) -> dict[str, dict]:
    preset = models.preset
    maybe_compiled = torch.compile if compile else lambda model: model
    config = models.layalign.config
    batch = training_batch(config, preset.train_batch, preset.encoder_len, text_len, preset.device, target_from)
    autocast = autocast_for(preset.device, preset.dtype)
    steps = step_functions(models, batch, autocast, maybe_compiled)
    sequence_len = models.layalign.num_prefix_positions(preset.encoder_len) + text_len
    embeds = torch.randn(
        preset.train_batch, sequence_len, models.llm.config.hidden_size, device=preset.device, dtype=preset.dtype
    )
    llm_labels = torch.full((preset.train_batch, sequence_len), -100, device=preset.device)
    llm_labels[:, -text_len:] = batch["labels"]
    llm = maybe_compiled(models.llm)
    steps["LLM alone, to its inputs"] = lambda: llm_step(llm, embeds, llm_labels, autocast)

    medians = interleaved_median_seconds(steps, preset.device, repeats, warmup=2)
    if profile:
        for name, step in steps.items():
            print_profile(f"one training step, {name}", step, preset.device)
    results = {
        name: {
            "seconds": medians[name],
            "examples_per_second": preset.train_batch / medians[name],
            "peak_memory_gib": peak_memory_gib(step, preset.device),
        }
        for name, step in steps.items()
    }
    for model in (models.layalign, models.mindmerger):
        model.eval()
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__, repeats=5, profile_help="Also profile one stage-1 step of each.")
    parser.add_argument("--compile", action="store_true", help="Run each contender through `torch.compile`.")
    args = parser.parse_args(argv)
    models = build_models(args.preset)
    preset = models.preset
    mode = "compiled" if args.compile else "eager"
    stages = {
        "stage 1": (preset.stage1_text_len, 0),
        "stage 2": (preset.stage2_text_len, preset.stage2_text_len // 2),
    }
    results = {"preset": args.preset, "device": describe_device(preset.device), "dtype": str(preset.dtype), "mode": mode}
    for stage, (text_len, target_from) in stages.items():
        profile = args.profile and stage == "stage 1"
        measured = measure_stage(models, text_len, target_from, args.repeats, profile, args.compile)
        results[stage] = measured
        mindmerger, llm = measured["MindMerger mode"]["seconds"], measured["LLM alone, to its inputs"]["seconds"]
        rows = [
            [
                name,
                f"{entry['seconds'] * 1000:.1f}",
                f"{entry['examples_per_second']:.2f}",
                f"{entry['seconds'] / mindmerger:.2f}x",
                f"{entry['seconds'] / llm:.2f}x",
                format_memory(entry["peak_memory_gib"]),
            ]
            for name, entry in measured.items()
        ]
        sequence_len = models.layalign.num_prefix_positions(preset.encoder_len) + text_len
        print_table(
            f"{stage} training step, preset {args.preset} ({results['device']}, {preset.dtype}, {mode}): batch "
            f"{preset.train_batch}, {preset.encoder_len} encoder tokens, {sequence_len} LLM tokens, median of "
            f"{args.repeats}",
            ["", "ms / step", "examples/s", "vs MindMerger mode", "vs LLM alone", "peak GiB"],
            rows,
        )
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
