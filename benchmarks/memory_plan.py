"""Memory per GPU for sharded LayAlign training, on paper, from the model's own parameter counts.

    python benchmarks/memory_plan.py                 # the paper's pair and a 70B LLM with mT5-xl, 8 GPUs
    python benchmarks/memory_plan.py --gpus 1 --batch 1   # one GPU: with the LLM in 4-bit (QLoRA-style) too

The models are built on the meta device from the published configs (no download, no memory), and every count below
is read off them. The rest is arithmetic, stated in `plan()`: frozen bases in bfloat16 (2 bytes per weight); the
trainable LayAlign modules with float32 weights, float32 gradients and AdamW's two float32 moments (16 bytes per
weight), as `Trainer` keeps them under bf16 autocast; activations of the LLM at the paper's batch (8 sequences of 200
tokens in stage 1, 512 in stage 2), with the per-layer estimate of Korthikanti et al. (2022) for bfloat16 activations
without recomputation, s*b*h*(34 + 5*a*s/h) bytes, or about 2*s*b*h bytes per layer with gradient checkpointing (the
layer inputs). Gradients must flow through every LLM layer (the input mapping feeds the first), so the frozen LLM's
activations count in full; the encoder runs without gradients. Not measured: allocator fragmentation, communication
buffers, the logits (8 x 512 x vocab in float32: 0.5 GB at a 32k vocabulary).

On one GPU the plan adds the LLM loaded in 4-bit NF4 with double quantization (`--quantize nf4`): bitsandbytes stores
the weights of every linear layer of the decoder in 4 bits plus one 8-bit scale per block of 64 and one float32
scale per 256 blocks (4.127 bits per weight), and keeps the embeddings, the output layer and the norms in bfloat16.
"""

import argparse

import torch
from transformers import LlamaConfig, MT5Config

from modeling_layalign import LayAlignConfig, LayAlignForCausalLM
from modeling_layalign.evaluation.cli_arguments import positive_int


GIB = 1024**3
MT5_XL = dict(vocab_size=250112, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, feed_forward_proj="gated-gelu")
LLAMA_2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
LLAMA_2_70B = dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8)
PAIRS = {"mT5-xl + Llama-2-7B (the paper's pair)": LLAMA_2_7B, "mT5-xl + Llama-2-70B": LLAMA_2_70B}


# bitsandbytes NF4 with double quantization: 4 bits, an 8-bit absmax per 64 weights, a float32 scale per 256 blocks.
NF4_BYTES_PER_WEIGHT = (4 + 8 / 64 + 32 / (64 * 256)) / 8


def parameter_counts(llm: dict) -> dict[str, int]:
    """Encoder, LLM (and the part of it in the decoder's linear layers, what 4-bit quantization packs) and trainable
    LayAlign weights of the pair, counted on the meta device."""
    config = LayAlignConfig(encoder_config=MT5Config(**MT5_XL).to_dict() | {"model_type": "mt5"}, text_config=LlamaConfig(**llm).to_dict())
    with torch.device("meta"):
        model = LayAlignForCausalLM(config)
    trainable = sum(p.numel() for name in model.layalign_module_names if (m := getattr(model, name)) is not None for p in m.parameters())
    decoder_linear = sum(
        module.weight.numel() for module in model.llm.get_decoder().modules() if isinstance(module, torch.nn.Linear)
    )
    return {
        "encoder": sum(p.numel() for p in model.encoder.parameters()),
        "llm": sum(p.numel() for p in model.llm.parameters()),
        "llm_decoder_linear": decoder_linear,
        "trainable": trainable,
    }


def activations_gib(llm: dict, tokens: int, batch: int, checkpointing: bool) -> float:
    hidden, heads, layers = llm["hidden_size"], llm["num_attention_heads"], llm["num_hidden_layers"]
    per_layer = 2 * tokens * batch * hidden if checkpointing else tokens * batch * hidden * (34 + 5 * heads * tokens / hidden)
    return per_layer * layers / GIB


def plan(counts: dict[str, int], llm: dict, gpus: int) -> list[tuple[str, float, float]]:
    """(engine, GiB per GPU of weights and optimizer state, of which bases) for each engine."""
    bases = 2 * (counts["encoder"] + counts["llm"]) / GIB
    trainable_state = 16 * counts["trainable"] / GIB
    trainable_weights_and_grads = 8 * counts["trainable"] / GIB  # float32 weight + float32 gradient
    if gpus == 1:
        quantized_llm = NF4_BYTES_PER_WEIGHT * counts["llm_decoder_linear"] + 2 * (counts["llm"] - counts["llm_decoder_linear"])
        four_bit_bases = (2 * counts["encoder"] + quantized_llm) / GIB
        return [("one GPU, bases in bf16", bases + trainable_state), ("one GPU, LLM in 4-bit NF4", four_bit_bases + trainable_state)]
    return [
        ("DDP", bases + trainable_state),
        ("ZeRO-2", bases + trainable_weights_and_grads / 2 + (trainable_state - trainable_weights_and_grads / 2) / gpus),
        ("FSDP 2 / ZeRO-3", (bases + trainable_state) / gpus),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=positive_int, default=8, help="GPUs; 1 gives the one-GPU rows, 4-bit LLM included.")
    parser.add_argument("--batch", type=positive_int, default=8, help="Sequences per GPU per micro-step (the paper: 8).")
    args = parser.parse_args(argv)
    for title, llm in PAIRS.items():
        counts = parameter_counts(llm)
        print(f"\n{title}: encoder {counts['encoder'] / 1e9:.2f}B, LLM {counts['llm'] / 1e9:.2f}B, "
              f"trainable LayAlign {counts['trainable'] / 1e6:.1f}M weights")  # fmt: skip
        print(f"| engine ({args.gpus} GPUs) | weights + optimizer, GiB per GPU | + activations, stage 1 (200 tokens) | "
              f"+ activations, stage 2 (512 tokens) | stage 2 with gradient checkpointing |")  # fmt: skip
        print("|---|---|---|---|---|")
        stage1 = activations_gib(llm, 200, args.batch, checkpointing=False)
        stage2 = activations_gib(llm, 512, args.batch, checkpointing=False)
        stage2_checkpointed = activations_gib(llm, 512, args.batch, checkpointing=True)
        for engine, state in plan(counts, llm, args.gpus):
            print(f"| {engine} | {state:.1f} | {state + stage1:.1f} | {state + stage2:.1f} | {state + stage2_checkpointed:.1f} |")


if __name__ == "__main__":
    main()
