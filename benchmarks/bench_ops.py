"""How many ATen operators LayAlign dispatches, against MindMerger mode and the LLM alone (issue 16).

    python benchmarks/bench_ops.py --preset paper                     # the paper pair's layer counts, about 40 s
    python benchmarks/bench_ops.py --preset tiny --json results/ops.json
    python benchmarks/bench_ops.py --preset paper --profiler          # also the profiler's count, as issue 16 quotes it

On a fast GPU, eager training steps and batch-1 decoding are bound by the host's operator dispatch, so the number of
operators a step dispatches predicts its time there. That number depends on the layer counts and the code path, not on
the widths, so it is counted here exactly on a CPU: the models have the layer counts of a real pair (`paper`: mT5-xl's
24 encoder layers, Llama-2-7B's 32 LLM layers, the fusion over encoder states 0..23 into all 32 LLM layers, as the
config's defaults and the paper have it; `tiny`: common.py's 3 and 4, what the test runs) and tiny widths, bases in the
preset's dtype (`paper`: bfloat16 bases, LayAlign modules float32, training under autocast, as `bench_train.py` runs
it on the GPU), and the shapes of `common.PRESETS`. Every count is taken twice and must come out the same.

What is counted, for LayAlign (gates at 0.1, so the fused branch runs), MindMerger mode (`use_layer_fusion=False`, the
same encoder and LLM objects) and the LLM alone:

- training step: forward with labels, then `loss.backward()`, then one AdamW step over the trainable parameters with
  `fused=True` (what `Trainer` uses by default with torch >= 2.8: `optim="adamw_torch_fused"`), counted after one
  untimed step so that the optimizer's state exists. Stage-1 layout: batch `train_batch`, `encoder_len` source
  tokens, every one of the `stage1_text_len` text tokens a target. The LLM alone runs forward and backward to its
  input embeddings over a sequence as long as LayAlign's `[BOS, mapped, boundary, text]`, with the text's labels and
  no optimizer (nothing of it trains), as in `bench_train.py`.
- prefill: `generate(max_new_tokens=1)` at batch 1 (for LayAlign and MindMerger mode the encoder, the fusion and the
  fused keys and values run inside it; "of which encode" counts `model.encode` alone). The LLM alone reads a prompt
  of `num_prefix_positions(encoder_len) + prompt_len` tokens, as long as LayAlign's LLM sequence.
- decoding step: `generate(max_new_tokens=k + 1)` minus `generate(max_new_tokens=k)`, batch 1, dynamic cache, greedy
  with end-of-sequence suppressed: one step as `generate` runs it (`prepare_inputs_for_generation`, the forward pass,
  the logits processing and the stopping check), however the model's `generate` is written. Taken for two values of
  `k`, which must agree.

The count is a `TorchDispatchMode`: it sees every operator that reaches a kernel, below autograd and autocast
(autocast's casts and every backward operator included; composite operators such as `aten.linear` appear as what they
decompose into: `aten.t` and `aten.addmm`). Everything dispatched is counted; the tables also give the count without
views (operators whose output aliases an input: `view`, `t`, `transpose`, `unbind`, `expand`, `detach`, ...), which
cost a dispatch but no kernel launch. While a Python dispatch mode is active, autograd detaches some tensors it saves
for the backward pass and some gradients it accumulates, which it does not otherwise: the `aten.detach` counts run
high, for all three systems. `aten._local_scalar_dense` (`.item()`, `int(tensor)`, `bool(tensor)`) is a host-device
synchronisation when the tensor is on a GPU (AdamW's per-parameter step counters stay on the CPU unless `capturable`
or `fused`); its count is shown apart. Counted on the CPU, LayAlign's and MindMerger mode's training forward shows
three: two are transformers' mask builders checking whether the padding mask can be skipped, one is the model's check
that `labels` hold a target token, which reads the labels only when they are on the CPU (no sync on a GPU).
`torch.profiler`'s count of `aten::` events (`--profiler`) also counts the composite operators and the operators they
call, so it is larger; it is the count `common.print_profile` prints and issue 16 quotes (21,243 / 16,759 / 12,423 for
one training step with the GPU's kernels; the CPU's kernels call other operators inside, so the CPU's profiler counts
differ from those).
"""

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig, MT5Config, MT5EncoderModel

from common import (
    PRESETS,
    Models,
    argument_parser,
    autocast_for,
    pair_models,
    print_table,
    random_ids,
    training_batch,
    write_json,
)


SYSTEMS = ("LayAlign", "MindMerger mode", "LLM alone")
SYNC_OPERATOR = "aten._local_scalar_dense.default"
# Issue 16's targets: (phase, numerator, denominator, most allowed).
TARGETS = (
    ("training step", "LayAlign", "MindMerger mode", 1.10),
    ("prefill", "LayAlign", "MindMerger mode", 1.15),
    ("decoding step", "LayAlign", "LLM alone", 1.05),
)


@dataclass(frozen=True)
class CountingPreset:
    """Layer counts (what the operator count depends on) and tiny widths (what it does not depend on).

    Attributes:
        encoder_layers / llm_layers: layers of the encoder and of the LLM.
        llm_heads / llm_kv_heads: attention heads of the LLM (grouped-query attention takes another code path).
        shapes: the `common.PRESETS` entry whose sequence lengths and batch sizes are used.
        dtype: dtype of the bases; the LayAlign modules stay float32 and training runs under autocast when it is not.
    """

    encoder_layers: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    shapes: str
    dtype: torch.dtype


COUNTING_PRESETS = {
    # The test suite's tiny models (common.py's `tiny`): 3 encoder layers, 4 LLM layers with grouped-query attention.
    "tiny": CountingPreset(3, 4, 4, 2, "tiny", torch.float32),
    # google/mt5-xl's encoder (24 layers, gated-gelu) and Llama-2-7B / MetaMath-7B (32 layers, as many key/value heads
    # as query heads), bfloat16 as on the GPU.
    "paper": CountingPreset(24, 32, 4, 4, "paper", torch.bfloat16),
}
ENCODER_WIDTH, LLM_WIDTH, VOCAB = 32, 64, 256


# -- counting ----------------------------------------------------------------------------------------------------------

# Names of the counted operators whose output aliases an input (`OpOverload.is_view`), filled as they are seen.
VIEW_OPERATORS: set[str] = set()


class OperatorCounter(TorchDispatchMode):
    """Counts, by overload name (`aten.mm.default`), every ATen operator dispatched while the mode is active."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        if func.is_view:
            VIEW_OPERATORS.add(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting() -> Iterator[Counter[str]]:
    """`with counting() as counts:` fills `counts` with the operators dispatched inside the block."""
    counter = OperatorCounter()
    with counter:
        yield counter.counts


def count(function: Callable[[], object]) -> Counter[str]:
    with counting() as counts:
        function()
    return counts


def total(counts: Counter[str]) -> int:
    return sum(counts.values())


def non_view_total(counts: Counter[str]) -> int:
    return sum(number for name, number in counts.items() if name not in VIEW_OPERATORS)


def difference(minuend: Counter[str], subtrahend: Counter[str]) -> Counter[str]:
    """`minuend - subtrahend` per operator, negative entries kept (unlike `Counter.__sub__`), zeros dropped."""
    result = Counter(minuend)
    result.subtract(subtrahend)
    return Counter({name: number for name, number in result.items() if number})


def profiler_count(function: Callable[[], object]) -> int:
    """The number of `aten::` events `torch.profiler` records for one call, as `common.print_profile` counts them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        function()
    return sum(event.count for event in profiler.key_averages() if event.key.startswith("aten::"))


def repeated(name: str, function: Callable[[], Counter[str]]) -> Counter[str]:
    """Runs a counting function twice and returns its counts, or raises if the two runs dispatched differently."""
    first, second = function(), function()
    if first != second:
        changed = sorted(difference(second, first).items())[:10]
        raise RuntimeError(f"Two counts of {name} differ ({total(first)} against {total(second)}): {changed}")
    return first


# -- models and inputs -------------------------------------------------------------------------------------------------


def build_models(name: str, seed: int = 0) -> Models:
    """LayAlign (gates at 0.1) and MindMerger mode over one random encoder and one random LLM with the preset's layer
    counts, in eval mode, on the CPU, paired as `common.build_models` pairs them."""
    preset = COUNTING_PRESETS[name]
    torch.manual_seed(seed)
    encoder_config = MT5Config(
        vocab_size=VOCAB, d_model=ENCODER_WIDTH, d_kv=8, d_ff=2 * ENCODER_WIDTH, num_layers=preset.encoder_layers,
        num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )  # fmt: skip
    llm_config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=LLM_WIDTH, intermediate_size=2 * LLM_WIDTH, num_hidden_layers=preset.llm_layers,
        num_attention_heads=preset.llm_heads, num_key_value_heads=preset.llm_kv_heads, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    encoder = MT5EncoderModel._from_config(encoder_config, dtype=preset.dtype)
    llm = AutoModelForCausalLM.from_config(llm_config, dtype=preset.dtype)
    return Models(*pair_models(encoder, llm), PRESETS[preset.shapes])


def generation_inputs(models: Models) -> dict[str, dict[str, torch.Tensor]]:
    """Batch-1 inputs of each system: LayAlign and MindMerger mode read the source and the prompt, the LLM alone a
    prompt as long as their LLM sequence."""
    shapes, config = models.preset, models.layalign.config
    prompt = random_ids(1, shapes.prompt_len, config.text_config.vocab_size, "cpu")
    source = {
        "encoder_input_ids": random_ids(1, shapes.encoder_len, config.encoder_config.vocab_size, "cpu"),
        "input_ids": prompt,
        "attention_mask": torch.ones_like(prompt),
    }
    llm_prompt_len = models.layalign.num_prefix_positions(shapes.encoder_len) + shapes.prompt_len
    llm_prompt = random_ids(1, llm_prompt_len, config.text_config.vocab_size, "cpu")
    return {
        "LayAlign": source,
        "MindMerger mode": source,
        "LLM alone": {"input_ids": llm_prompt, "attention_mask": torch.ones_like(llm_prompt)},
    }


# -- the three measurements --------------------------------------------------------------------------------------------


@dataclass
class TrainingStep:
    """One training step of one system, split in its three parts. `run(counted)` runs it once, counting each part
    when `counted`; `run(False)` returns empty counts."""

    forward: Callable[[], torch.Tensor]
    optimizer: torch.optim.Optimizer | None

    def run(self, counted: bool = True) -> dict[str, Counter[str]]:
        scope = counting if counted else _not_counting
        with scope() as forward:
            loss = self.forward()
        with scope() as backward:
            loss.backward()
        parts = {"forward": forward, "backward": backward}
        if self.optimizer is not None:
            with scope() as step:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            parts["optimizer"] = step
        return parts

    def run_whole(self) -> None:
        """The step without counting, for the profiler."""
        self.run(counted=False)


@contextlib.contextmanager
def _not_counting() -> Iterator[Counter[str]]:
    yield Counter()


def training_steps(models: Models) -> dict[str, TrainingStep]:
    """The step of each system, as `bench_train.py` times it (forward + backward + AdamW; the LLM alone forward and
    backward to its input embeddings)."""
    shapes, dtype = models.preset, models.llm.dtype
    autocast = autocast_for("cpu", dtype)
    batch = training_batch(
        models.layalign.config, shapes.train_batch, shapes.encoder_len, shapes.stage1_text_len, "cpu"
    )  # stage 1: every text token a target
    steps = {}
    for name, model in (("LayAlign", models.layalign), ("MindMerger mode", models.mindmerger)):
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)

        def forward(model=model) -> torch.Tensor:
            with autocast():
                return model(**batch).loss

        steps[name] = TrainingStep(forward, optimizer)

    sequence_len = models.layalign.num_prefix_positions(shapes.encoder_len) + shapes.stage1_text_len
    embeds = torch.randn(shapes.train_batch, sequence_len, models.llm.config.hidden_size, dtype=dtype)
    llm_labels = torch.full((shapes.train_batch, sequence_len), -100)
    llm_labels[:, -shapes.stage1_text_len :] = batch["labels"]

    def llm_forward() -> torch.Tensor:
        leaf = embeds.detach().requires_grad_(True)  # a fresh leaf: its gradient is stored, never accumulated
        with autocast():
            return models.llm(inputs_embeds=leaf, labels=llm_labels).loss

    steps["LLM alone"] = TrainingStep(llm_forward, None)
    return steps


def generation_settings(text_config) -> dict:
    """Greedy decoding with end-of-sequence suppressed (`min_new_tokens`), as in `bench_generate.py`."""
    return dict(do_sample=False, pad_token_id=text_config.pad_token_id, eos_token_id=text_config.eos_token_id)


def generate(model, inputs: dict, new_tokens: int, settings: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)


def encode(model, inputs: dict) -> None:
    with torch.no_grad():
        model.encode(inputs["encoder_input_ids"])


def count_training(models: Models) -> dict[str, dict[str, Counter[str]]]:
    """Per system, the operators of each part of one training step (after one uncounted step)."""
    models.layalign.train()  # the shared encoder and LLM with it; the encoder's dropout is on, as in training
    results = {}
    for name, step in training_steps(models).items():
        step.run(counted=False)
        parts = {}
        first, second = step.run(), step.run()
        for part in first:
            if first[part] != second[part]:
                changed = sorted(difference(second[part], first[part]).items())[:10]
                raise RuntimeError(f"Two counts of the {name} training step's {part} differ: {changed}")
            parts[part] = first[part]
        parts["step"] = sum(parts.values(), Counter())
        results[name] = parts
    models.layalign.eval()
    return results


def count_generation(models: Models, decode_from: int = 2) -> dict[str, dict[str, Counter[str]]]:
    """Per system, the operators of prefill (and of `encode` within it) and of one decoding step at batch 1.

    The decoding step is `generate(k + 1) - generate(k)` for `k = decode_from` and `decode_from + 1`; the two must
    agree (every decoding step after the first dispatches the same).
    """
    settings = generation_settings(models.layalign.config.text_config)
    generators = {"LayAlign": models.layalign, "MindMerger mode": models.mindmerger, "LLM alone": models.llm}
    results = {}
    for name, inputs in generation_inputs(models).items():
        model = generators[name]
        generate(model, inputs, decode_from, settings)  # warm-up
        runs = {
            new_tokens: repeated(
                f"{name} generate({new_tokens})",
                lambda new_tokens=new_tokens: count(lambda: generate(model, inputs, new_tokens, settings)),
            )
            for new_tokens in (1, decode_from, decode_from + 1, decode_from + 2)
        }
        step = difference(runs[decode_from + 1], runs[decode_from])
        next_step = difference(runs[decode_from + 2], runs[decode_from + 1])
        if step != next_step:
            changed = sorted(difference(next_step, step).items())
            raise RuntimeError(f"{name}: two decoding steps dispatch differently: {changed}")
        results[name] = {"prefill": runs[1], "decoding step": step}
        if name != "LLM alone":
            results[name]["encode"] = repeated(f"{name} encode", lambda: count(lambda: encode(model, inputs)))
    return results


def count_with_profiler(models: Models) -> dict[str, dict[str, int]]:
    """`torch.profiler`'s `aten::` event count of each system's training step and prefill."""
    settings = generation_settings(models.layalign.config.text_config)
    generators = {"LayAlign": models.layalign, "MindMerger mode": models.mindmerger, "LLM alone": models.llm}
    models.layalign.train()
    results = {name: {} for name in SYSTEMS}
    for name, step in training_steps(models).items():
        step.run_whole()
        results[name]["training step"] = profiler_count(step.run_whole)
    models.layalign.eval()
    for name, inputs in generation_inputs(models).items():
        results[name]["prefill"] = profiler_count(lambda: generate(generators[name], inputs, 1, settings))
    return results


# -- report ------------------------------------------------------------------------------------------------------------


def ratio(counts: dict, phase: str, numerator: str, denominator: str) -> float:
    return total(counts[numerator][phase]) / total(counts[denominator][phase])


def print_counts(counts: dict, sizes: Callable[[Counter[str]], int], title: str) -> None:
    phases = ("step", "forward", "backward", "optimizer", "prefill", "encode", "decoding step")
    header = [
        "", "training step", "of which forward", "backward", "AdamW", "prefill (batch 1)", "of which encode",
        "decoding step (batch 1)",
    ]  # fmt: skip
    rows = [
        [name] + [f"{sizes(counts[name][phase]):,}" if phase in counts[name] else "" for phase in phases]
        for name in SYSTEMS
    ]
    print_table(title, header, rows)


def print_ratios(counts: dict) -> None:
    pairs = (("LayAlign", "MindMerger mode"), ("LayAlign", "LLM alone"), ("MindMerger mode", "LLM alone"))
    rows = []
    for numerator, denominator in pairs:
        row = [f"{numerator} / {denominator}"]
        for phase in ("step", "forward", "backward", "prefill", "decoding step"):
            row.append(f"{ratio(counts, phase, numerator, denominator):.3f}x")
        rows.append(row)
    print_table(
        "ratios of operator counts (all dispatched)",
        ["", "training step", "forward", "backward", "prefill", "decoding step"],
        rows,
    )


def targets(counts: dict) -> list[dict]:
    results = []
    for phase, numerator, denominator, limit in TARGETS:
        key = "step" if phase == "training step" else phase
        value = ratio(counts, key, numerator, denominator)
        results.append(
            {"phase": phase, "against": denominator, "ratio": value, "target": limit, "met": value <= limit}
        )
    return results


def print_targets(results: list[dict]) -> None:
    rows = [
        [
            f"{entry['phase']}: LayAlign / {entry['against']}",
            f"{entry['ratio']:.3f}x",
            f"<= {entry['target']:.2f}x",
            "met" if entry["met"] else "NOT met",
        ]
        for entry in results
    ]
    print_table("issue 16's targets, on operator counts", ["", "ratio", "target", ""], rows)


def print_added(title: str, columns: dict[str, Counter[str]], top: int) -> None:
    """Per operator, how many more one system dispatches than another in each column; sorted by the last column."""
    names = sorted(
        {name for column in columns.values() for name in column},
        key=lambda name: (-list(columns.values())[-1][name], name),
    )
    shown, rest = names[:top], names[top:]
    rows = [[name] + [f"{column[name]:+,}" if column[name] else "" for column in columns.values()] for name in shown]
    if rest:
        rows.append(
            [f"{len(rest)} other kinds"] + [f"{sum(column[name] for name in rest):+,}" for column in columns.values()]
        )
    rows.append(["all"] + [f"{total(column):+,}" for column in columns.values()])
    print_table(title, ["operator"] + list(columns), rows)


def print_additions(counts: dict, top: int) -> None:
    layalign, mindmerger, llm = (counts[name] for name in SYSTEMS)
    print_added(
        "operators LayAlign adds over MindMerger mode, training step",
        {part: difference(layalign[part], mindmerger[part]) for part in ("forward", "backward", "optimizer", "step")},
        top,
    )
    print_added(
        "operators LayAlign adds over MindMerger mode, prefill (batch 1)",
        {
            "encode": difference(layalign["encode"], mindmerger["encode"]),
            "prefill": difference(layalign["prefill"], mindmerger["prefill"]),
        },
        top,
    )
    print_added(
        "operators one decoding step adds over the LLM alone (batch 1)",
        {
            "MindMerger mode": difference(mindmerger["decoding step"], llm["decoding step"]),
            "LayAlign": difference(layalign["decoding step"], llm["decoding step"]),
        },
        top,
    )


def describe(models: Models, name: str) -> str:
    config, shapes = models.layalign.config, models.preset
    return (
        f"preset {name}: {config.encoder_config.num_layers} encoder layers "
        f"(states {_span(config.fused_encoder_layers)} fused), {config.text_config.num_hidden_layers} LLM layers "
        f"({len(config.adapted_llm_layers)} adapted), "
        f"widths {config.encoder_config.d_model} / {config.text_config.hidden_size}, bases {models.llm.dtype}; "
        f"training batch {shapes.train_batch}, {shapes.encoder_len} encoder tokens, "
        f"{models.layalign.num_prefix_positions(shapes.encoder_len) + shapes.stage1_text_len} LLM tokens; generation "
        f"batch 1, {shapes.encoder_len} encoder + {shapes.prompt_len} prompt tokens; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def _span(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__)
    parser.set_defaults(preset="paper")
    parser.add_argument("--top", type=int, default=25, help="Operator kinds shown in each difference table.")
    parser.add_argument(
        "--profiler", action="store_true", help="Also count `aten::` events with `torch.profiler`, as issue 16 does."
    )
    args = parser.parse_args(argv)
    if args.preset not in COUNTING_PRESETS:
        parser.error(f"bench_ops.py counts the presets {sorted(COUNTING_PRESETS)}, not {args.preset!r}.")
    start = time.perf_counter()
    models = build_models(args.preset)
    print(describe(models, args.preset))

    counts = {name: {} for name in SYSTEMS}
    for name, parts in count_training(models).items():
        counts[name].update(parts)
    for name, parts in count_generation(models).items():
        counts[name].update(parts)
    print("every count was taken twice, with the same result; two decoding steps dispatched the same")

    print_counts(counts, total, "ATen operators dispatched (forward and backward; AdamW fused, Trainer's default)")
    print_counts(counts, non_view_total, "of which not views (operators whose output aliases no input)")
    print_counts(
        counts,
        lambda part: part[SYNC_OPERATOR],
        f"of which scalar reads ({SYNC_OPERATOR}: item, int, bool; a host-device sync where the tensor is on the GPU, "
        "which AdamW's step counters are not)",
    )
    print_ratios(counts)
    met = targets(counts)
    print_targets(met)
    print_additions(counts, args.top)

    results = {
        "preset": args.preset,
        "setup": describe(models, args.preset),
        "totals": {name: {phase: total(part) for phase, part in parts.items()} for name, parts in counts.items()},
        "non_view_totals": {
            name: {phase: non_view_total(part) for phase, part in parts.items()} for name, parts in counts.items()
        },
        "operators": {name: {phase: dict(part) for phase, part in parts.items()} for name, parts in counts.items()},
        "targets": met,
    }
    if args.profiler:
        profiled = count_with_profiler(models)
        print_table(
            "torch.profiler's aten:: events (composite operators and what they call, as common.print_profile counts)",
            ["", "training step", "prefill (batch 1)"],
            [[name, f"{profiled[name]['training step']:,}", f"{profiled[name]['prefill']:,}"] for name in SYSTEMS],
        )
        results["profiler_events"] = profiled
    print(f"\ncounted in {time.perf_counter() - start:.0f} s")
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
