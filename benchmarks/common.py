"""What the benchmarks share: the three presets, the models they compare, and timing.

Presets (the shapes come from issue 8 and the reference figures it quotes):

- `tiny`: random Llama + mT5 of width 64, float32, CPU; seconds, run by the test suite.
- `demo`: the demo models (multilingual-e5-small + SmolLM2-135M-Instruct, prepared by `layalign_demo`), float32.
- `paper`: the paper's pair at random init, mT5-xl's encoder config + Llama-2-7B's config, bfloat16 on one GPU,
  no download: 64 encoder tokens, 128 prompt tokens, 128 new tokens; training batch 8 x 200 LLM tokens.

Every benchmark compares models that share one encoder and one LLM: LayAlign (gates set to 0.1, so the fused
branch is computed as in a trained model), MindMerger mode (`use_layer_fusion=False`, input mapping only) and the
LLM alone, reading a prompt as long as LayAlign's whole sequence. Ratios are taken inside one process, with the
same shapes, so that they hold on other machines; absolute times mean something only on a GPU.
"""

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MT5Config, MT5EncoderModel

from modeling_layalign import LayAlignConfig, LayAlignForCausalLM
from modeling_layalign.evaluation.cli_arguments import positive_int


@dataclass(frozen=True)
class Preset:
    """Shapes, dtype and device of one benchmark preset.

    Attributes:
        encoder_len: source tokens read by the encoder.
        prompt_len: LLM prompt tokens after the boundary (generation).
        new_tokens: tokens generated per sequence.
        decode_batches: batch sizes for generation.
        train_batch: examples per training step.
        stage1_text_len / stage2_text_len: LLM text tokens after the boundary in a stage-1 (translation target)
            and a stage-2 (prompt and answer) training example.
        dtype: dtype of the two bases; the LayAlign modules stay float32 and training runs under autocast when it
            is not float32.
    """

    encoder_len: int
    prompt_len: int
    new_tokens: int
    decode_batches: tuple[int, ...]
    train_batch: int
    stage1_text_len: int
    stage2_text_len: int
    dtype: torch.dtype
    device: str


PRESETS = {
    "tiny": Preset(16, 24, 8, (1, 4), 4, 16, 32, torch.float32, "cpu"),
    "demo": Preset(48, 64, 32, (1, 8), 8, 48, 96, torch.float32, "cpu"),
    # 1 (BOS) + 64 mapped + 1 (boundary) + 134 = 200 LLM tokens per training example.
    "paper": Preset(64, 128, 128, (1, 32), 8, 134, 134, torch.bfloat16, "cuda"),
}


@dataclass
class Models:
    """One encoder and one LLM, shared by LayAlign and MindMerger mode."""

    layalign: LayAlignForCausalLM
    mindmerger: LayAlignForCausalLM
    preset: Preset

    @property
    def llm(self):
        return self.layalign.llm


def build_models(name: str, seed: int = 0) -> Models:
    """LayAlign and MindMerger mode over the preset's bases, in eval mode."""
    preset = PRESETS[name]
    torch.manual_seed(seed)
    if name == "demo":
        from layalign_demo import prepare_demo_models

        encoder, llm = prepare_demo_models()
    else:
        encoder, llm = _random_bases(name, preset)
    return Models(*pair_models(encoder, llm, preset.device), preset)


def pair_models(encoder, llm, device: str = "cpu") -> tuple[LayAlignForCausalLM, LayAlignForCausalLM]:
    """LayAlign (gates at 0.1, so that the fused branch runs) and MindMerger mode with the same input mapping, over
    the same `encoder` and `llm` objects, in eval mode on `device`; the LayAlign modules float32."""
    layalign = LayAlignForCausalLM.from_base_models(encoder, llm)
    mindmerger = LayAlignForCausalLM.from_base_models(layalign.encoder, layalign.llm, use_layer_fusion=False)
    mindmerger.input_mapping.load_state_dict(layalign.input_mapping.state_dict())
    for model in (layalign, mindmerger):
        for module_name in model.layalign_module_names:
            if (module := getattr(model, module_name)) is not None:
                module.float()
        model.to(device).eval()
    with torch.no_grad():
        layalign.gates.weight.fill_(0.1)
    return layalign, mindmerger


def _random_bases(name: str, preset: Preset):
    if name == "tiny":
        encoder_config = MT5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4)
        llm_config = LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
    else:
        # google/mt5-xl and meta-llama/Llama-2-7b-hf, from their published config.json.
        encoder_config = MT5Config(
            vocab_size=250112, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        )  # fmt: skip
        llm_config = LlamaConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            pad_token_id=0,
        )  # fmt: skip
    with torch.device(preset.device):
        encoder = MT5EncoderModel._from_config(encoder_config, dtype=preset.dtype)
        llm = AutoModelForCausalLM.from_config(llm_config, dtype=preset.dtype)
    return encoder, llm


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_median_seconds(
    functions: dict[str, Callable[[], object]], device: str, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall time of each function, timed in turns (A, B, C, A, B, C, ...) after `warmup` untimed rounds.

    Taking turns spreads any drift of the machine (other processes, clock changes) over every function alike, so
    their ratios stay meaningful on a shared CPU.
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory_gib(function: Callable[[], object], device: str) -> float | None:
    """Peak GPU memory allocated during one call of `function()`, in GiB; `None` on a CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    function()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def print_profile(title: str, function: Callable[[], object], device: str, rows: int = 15) -> None:
    """Runs `function()` once under `torch.profiler` and prints its most expensive operators (device time on a GPU,
    CPU time on a CPU) and how many operators it dispatched: where a step's time goes."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        function()
        synchronize(device)
    events = profiler.key_averages()
    operators = sum(event.count for event in events if event.key.startswith("aten::"))
    print(f"\nprofile: {title} ({operators} aten operators dispatched)")
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort_by, row_limit=rows, max_name_column_width=60))


def random_ids(batch: int, length: int, vocab_size: int, device: str, low: int = 3) -> torch.Tensor:
    """Token ids away from the special ids at the bottom of the vocabulary."""
    return torch.randint(low, vocab_size, (batch, length), device=device)


def training_batch(
    config: LayAlignConfig, batch: int, encoder_len: int, text_len: int, device: str, target_from: int = 0
) -> dict[str, torch.Tensor]:
    """`batch` random examples of `encoder_len` source and `text_len` text tokens; the text's labels are targets from
    position `target_from` on (stage 1: 0, the whole translation; stage 2: the answer after the question)."""
    labels = random_ids(batch, text_len, config.text_config.vocab_size, device)
    labels[:, :target_from] = -100
    return {
        "encoder_input_ids": random_ids(batch, encoder_len, config.encoder_config.vocab_size, device),
        "input_ids": random_ids(batch, text_len, config.text_config.vocab_size, device),
        "labels": labels,
    }


def autocast_for(device: str, dtype: torch.dtype) -> Callable[[], contextlib.AbstractContextManager]:
    """The context a training step runs in: autocast to `dtype` when the bases are not float32 (the LayAlign modules
    stay float32), nothing otherwise."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device, dtype=dtype)


def format_memory(gib: float | None) -> str:
    return "n/a (CPU)" if gib is None else f"{gib:.2f}"


def describe_device(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def argument_parser(
    description: str, repeats: int | None = None, profile_help: str | None = None
) -> argparse.ArgumentParser:
    """The options the benchmarks share: `--preset`, `--json` and, where they time or profile, `--repeats` and
    `--profile`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    if repeats is not None:
        parser.add_argument("--repeats", type=positive_int, default=repeats)
    parser.add_argument("--json", help="Also write the results to this file.")
    if profile_help is not None:
        parser.add_argument("--profile", action="store_true", help=profile_help)
    return parser


def write_json(results: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2))
