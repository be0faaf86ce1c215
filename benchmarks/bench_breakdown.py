"""Where LayAlign's extra wall-clock time goes, part by part, next to the arithmetic each part must do.

    python benchmarks/bench_breakdown.py --preset demo --threads 2

Prefill (at each of the preset's decoding batches) and the stage-1 training step are timed whole, and each part
LayAlign adds is timed alone, with the model's own modules at the shapes it has inside the model, all in turns in one
process (`interleaved_median_seconds`). Each row gives its time as a share of the baseline's time (the LLM alone
reading an equally long prompt for prefill, MindMerger mode for the step) and its multiply-adds as a share of the
baseline's. A part whose time share is near its arithmetic share is the method's cost; "other" is the whole
difference minus the timed parts (Python, masks, concatenations, dispatch). The training parts are timed forward and
backward, as the step runs them (the encoder and the LLM frozen, the LayAlign modules trained).
"""

import contextlib
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from modeling_layalign.attention_layalign import fused_branch_attention, llm_family, project_fused_kv
from modeling_layalign.evaluation.cli_arguments import positive_int

import bench_generate
import bench_train
from common import (
    Models,
    argument_parser,
    autocast_for,
    build_models,
    interleaved_median_seconds,
    print_table,
    training_batch,
    write_json,
)


# torch's counter knows the GPU attention kernels; the CPU's flash kernel takes the same leading arguments.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad, query, key, value, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, query, key, value)
    ),
}


def multiply_adds(function: Callable[[], object]) -> int:
    """Multiply-adds of the matrix products and attention `function` runs, forward and backward, as torch's
    `FlopCounterMode` counts them (attention as if unmasked: a causal mask's skipped half is counted too)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        function()
    return counter.get_total_flops() // 2


@contextlib.contextmanager
def without_gradients(model: torch.nn.Module):
    """No parameter of `model` requires a gradient inside: `FlopCounterMode`'s module tracker fails on the views of a
    parameter that `no_grad` code returns (they require a gradient but have no `grad_fn`), such as the boundary."""
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in trained:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trained:
            parameter.requires_grad_(True)


class Parts:
    """Each part LayAlign adds, runnable alone at one batch's shapes, with its multiply-adds.

    `llm_len` is the number of positions the LLM reads ([BOS, mapped source, boundary, text]); `train` runs every part
    forward and backward (gradients to the LayAlign modules and, through the frozen maps, to their inputs).
    """

    def __init__(self, model, batch: int, encoder_len: int, llm_len: int, train: bool):
        self.model, self.train, self.shape = model, train, (batch, encoder_len, llm_len)
        self.attention = model._adapted_attention_modules()
        self.family = llm_family(model.config.text_config)
        config = model.config
        self.encoder_ids = torch.randint(3, config.encoder_config.vocab_size, (batch, encoder_len))
        self.encoder_mask = torch.ones(batch, encoder_len, dtype=torch.long)
        with torch.no_grad():
            encoded = model.encoder(self.encoder_ids, attention_mask=self.encoder_mask, output_hidden_states=True)
            self.layers = torch.stack([encoded.hidden_states[i] for i in config.fused_encoder_layers], dim=-1)
            self.fused = model.fusion(self.layers)
        self.last_state = encoded.last_hidden_state
        self.padding = self.encoder_mask.float().view(batch, encoder_len, 1, 1)
        self.sources = self.fused.flatten(0, 1).unbind(1)
        first = self.attention[0]
        self.query = torch.randn(batch, first.config.num_attention_heads, llm_len, first.head_dim)
        self.bias = torch.zeros(batch, 1, 1, encoder_len)
        with torch.no_grad():
            self.keys_values = self._project(self.sources)

    def _project(self, sources) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            project_fused_kv(module, sources[2 * slot], sources[2 * slot + 1], self.shape[:2], None, self.family)
            for slot, module in enumerate(self.attention)
        ]

    def _run(self, outputs: Callable[[], list[torch.Tensor]]) -> None:
        with torch.set_grad_enabled(self.train):
            results = outputs()
        if self.train:
            torch.autograd.backward(results, [torch.ones_like(result) for result in results])

    def encoder(self) -> None:
        with torch.no_grad():
            self.model.encoder(self.encoder_ids, attention_mask=self.encoder_mask, output_hidden_states=True)

    def input_mapping(self) -> None:
        self._run(lambda: [self.model.input_mapping(self.last_state)])

    def fusion(self) -> None:
        self._run(lambda: [self.model.fusion(self.layers)])

    def gate_scale(self) -> None:
        fused = self.fused.detach().requires_grad_(self.train)
        self._run(lambda: [fused * (self.model.gates(per_source=True) * self.padding)])

    def fused_keys_values(self) -> None:
        sources = [source.detach().requires_grad_(self.train) for source in self.sources]
        self._run(lambda: [tensor for pair in self._project(sources) for tensor in pair])

    def fused_attention(self) -> None:
        query = self.query.detach().requires_grad_(self.train)
        keys_values = [(k.detach().requires_grad_(self.train), v.detach().requires_grad_(self.train)) for k, v in self.keys_values]

        def attend():
            return [
                fused_branch_attention(module, query, keys, values, self.bias, None)
                for module, (keys, values) in zip(self.attention, keys_values)
            ]

        self._run(attend)

    def functions(self) -> dict[str, Callable[[], None]]:
        return {
            "encoder": self.encoder,
            "input mapping": self.input_mapping,
            "fusion (layer mix, projection)": self.fusion,
            "gate and padding scale": self.gate_scale,
            "fused keys and values (k_proj, v_proj)": self.fused_keys_values,
            "fused attention": self.fused_attention,
        }


OTHER = "other (the difference minus the parts)"


def breakdown(
    functions: dict[str, Callable[[], None]], whole: str, baseline: str, parts: list[str], repeats: int
) -> dict[str, dict[str, float]]:
    """Times every function in turns and counts its multiply-adds: name -> `seconds`, `multiply_adds`, in the order
    baseline, whole, parts, and `OTHER`, what the parts leave of the whole's difference to the baseline."""
    seconds = interleaved_median_seconds(functions, "cpu", repeats, warmup=2)
    macs = {name: multiply_adds(function) for name, function in functions.items()}
    seconds[OTHER] = seconds[whole] - seconds[baseline] - sum(seconds[part] for part in parts)
    macs[OTHER] = macs[whole] - macs[baseline] - sum(macs[part] for part in parts)
    return {name: {"seconds": seconds[name], "multiply_adds": macs[name]} for name in (baseline, whole, *parts, OTHER)}


def table_rows(result: dict[str, dict[str, float]]) -> list[list[str]]:
    """Each entry's time and multiply-adds as shares of the first entry's (the baseline's); parts marked `+`."""
    base = next(iter(result.values()))
    return [
        [
            f"+ {name}" if index > 1 else name,
            f"{entry['seconds'] * 1000:.1f}",
            f"{entry['seconds'] / base['seconds']:.1%}",
            f"{entry['multiply_adds'] / base['multiply_adds']:.1%}",
        ]
        for index, (name, entry) in enumerate(result.items())
    ]


def prefill_breakdown(models: Models, batch: int, repeats: int) -> dict[str, dict[str, float]]:
    """LayAlign's `generate` of one token against the LLM alone's over as many positions, and LayAlign's parts."""
    preset = models.preset
    inputs = bench_generate.generation_inputs(models, batch)
    settings = bench_generate.generation_settings(models.layalign.config.text_config, static_cache=False)
    llm_len = models.layalign.num_prefix_positions(preset.encoder_len) + preset.prompt_len
    parts = Parts(models.layalign, batch, preset.encoder_len, llm_len, train=False).functions()
    functions = {
        "LLM alone": lambda: bench_generate.generate(models.llm, inputs["LLM alone"], 1, settings),
        "LayAlign": lambda: bench_generate.generate(models.layalign, inputs["LayAlign"], 1, settings),
        **parts,
    }
    with without_gradients(models.layalign):
        return breakdown(functions, "LayAlign", "LLM alone", list(parts), repeats)


def training_breakdown(models: Models, repeats: int) -> dict[str, dict[str, float]]:
    """A stage-1 training step of LayAlign against MindMerger mode's, and the parts only LayAlign runs (both run the
    encoder and the input mapping)."""
    preset = models.preset
    text_len = preset.stage1_text_len
    llm_len = models.layalign.num_prefix_positions(preset.encoder_len) + text_len
    batch = training_batch(models.layalign.config, preset.train_batch, preset.encoder_len, text_len, preset.device)
    steps = bench_train.step_functions(models, batch, autocast_for(preset.device, preset.dtype))
    functions = {"MindMerger mode": steps["MindMerger mode"], "LayAlign": steps["LayAlign"]}
    parts = Parts(models.layalign, preset.train_batch, preset.encoder_len, llm_len, train=True).functions()
    for shared in ("encoder", "input mapping"):
        parts.pop(shared)
    functions.update(parts)
    result = breakdown(functions, "LayAlign", "MindMerger mode", list(parts), repeats)
    for model in (models.layalign, models.mindmerger):
        model.eval()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__, repeats=5)
    parser.add_argument("--threads", type=positive_int, default=2, help="CPU threads.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = build_models(args.preset)
    preset = models.preset
    settings = f"preset {args.preset}, {args.threads} threads, median of {args.repeats}"
    titles = {
        f"prefill, batch {batch}": f"Prefill, batch {batch} ({settings}): LayAlign against the LLM alone reading an "
        "equally long prompt"
        for batch in preset.decode_batches
    }
    titles["training step"] = (
        f"Training step, batch {preset.train_batch}, {preset.encoder_len} + {preset.stage1_text_len} tokens "
        f"({settings}): LayAlign against MindMerger mode"
    )
    results = {f"prefill, batch {batch}": prefill_breakdown(models, batch, args.repeats) for batch in preset.decode_batches}
    results["training step"] = training_breakdown(models, args.repeats)
    header = ["", "ms", "time, of the baseline's", "multiply-adds, of the baseline's"]
    for key, result in results.items():
        print_table(titles[key], header, table_rows(result))
    write_json({"preset": args.preset, "threads": args.threads, **results}, args.json)
    return results


if __name__ == "__main__":
    main()
