"""Tiny random models built from configs (width 32, two layers), as transformers' own tests build them."""

import os
import socket
from pathlib import Path


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    M2M100Config,
    MistralConfig,
    MT5Config,
    Qwen2Config,
    Qwen3Config,
    XLMRobertaConfig,
)

from modeling_layalign import LayAlignConfig, LayAlignForCausalLM  # noqa: E402
from modeling_layalign.processing_layalign import pad_sequences as pad  # noqa: E402


LLM_VOCAB = 128
ENCODER_VOCAB = 96
LLM_PAD = 0
_ATTENTION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_LLM_TOKENS = dict(vocab_size=LLM_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=LLM_PAD)

LLM_CONFIGS = {
    "llama": lambda: LlamaConfig(**_ATTENTION, **_LLM_TOKENS),
    "mistral": lambda: MistralConfig(**_ATTENTION, **_LLM_TOKENS, sliding_window=4),
    "qwen2": lambda: Qwen2Config(**_ATTENTION, **{**_LLM_TOKENS, "bos_token_id": None}),
    "qwen3": lambda: Qwen3Config(**_ATTENTION, **_LLM_TOKENS, head_dim=8),
    "gemma2": lambda: Gemma2Config(
        **_ATTENTION, **_LLM_TOKENS, head_dim=8, query_pre_attn_scalar=16, sliding_window=4, attn_logit_softcapping=5.0
    ),
    "gemma3_text": lambda: Gemma3TextConfig(
        **_ATTENTION,
        **_LLM_TOKENS,
        head_dim=8,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),
}

ENCODER_CONFIGS = {
    "mt5": lambda: MT5Config(vocab_size=ENCODER_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "xlm-roberta": lambda: XLMRobertaConfig(
        vocab_size=ENCODER_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    ),
    "m2m_100": lambda: M2M100Config(
        vocab_size=ENCODER_VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
    ),
    "qwen2": lambda: Qwen2Config(
        vocab_size=ENCODER_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def tiny_config(llm: str = "llama", encoder: str = "mt5", **config_kwargs) -> LayAlignConfig:
    return LayAlignConfig(encoder_config=ENCODER_CONFIGS[encoder](), text_config=LLM_CONFIGS[llm](), **config_kwargs)


def tiny_model(llm: str = "llama", encoder: str = "mt5", seed: int = 0, **config_kwargs) -> LayAlignForCausalLM:
    """A tiny LayAlign model in eval mode.

    The mapping, boundary and fusion get weights large enough for every LayAlign part to show in the output (the
    default initialisation is tuned for real widths); the gates keep their initial zeros.
    """
    torch.manual_seed(seed)
    model = LayAlignForCausalLM(tiny_config(llm, encoder, **config_kwargs)).eval()
    with torch.no_grad():
        for name in ("input_mapping", "boundary", "fusion"):
            if (module := getattr(model, name)) is not None:
                for parameter in module.parameters():
                    parameter.normal_(std=0.3)
    return model


def with_trained_layalign_weights(model: LayAlignForCausalLM) -> LayAlignForCausalLM:
    """`model` in eval mode with every LayAlign weight moved off its initial value (the gates off zero), so that each
    shows in the logits, as after training."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name in model.layalign_module_names:
            if (module := getattr(model, name)) is not None:
                for parameter in module.parameters():
                    parameter.normal_(std=0.3)
    return model.eval()


def set_gates(model: LayAlignForCausalLM, value: float) -> None:
    with torch.no_grad():
        model.gates.weight.fill_(value)


def encoder_pad_id(model: LayAlignForCausalLM) -> int:
    pad = model.config.encoder_config.pad_token_id
    return 0 if pad is None else pad


def random_ids(lengths, vocab: int, generator: torch.Generator) -> list[list[int]]:
    """Token ids that avoid the low special ids (pad, bos, eos, unk)."""
    return [torch.randint(4, vocab, (length,), generator=generator).tolist() for length in lengths]


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


SAMPLE_TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Weng earns $12 an hour for babysitting. How much did she earn?",
    "Natalia hat im April Clips an 48 ihrer Freunde verkauft.",
    "Bata wa Janet hutaga mayai 16 kila siku.",
    "The answer is: 72",
]


def train_tiny_tokenizer(vocab_size: int, special_tokens: list[str], bos: str | None, eos: str, wrap: bool):
    """A small BPE tokenizer trained on a few sentences, wrapped as a `PreTrainedTokenizerFast`.

    `wrap` adds `<bos> text <eos>` around every encoding, as encoder tokenizers do.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, limit_alphabet=50)
    tokenizer.train_from_iterator(SAMPLE_TEXTS * 4, trainer=trainer)
    if wrap:
        first = [bos] if bos else []
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(first + ["$A", eos]),
            special_tokens=[(token, tokenizer.token_to_id(token)) for token in first + [eos]],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny_bases(root: Path, tie_word_embeddings: bool = False) -> dict[str, str]:
    """Saves a tiny mT5 (as a seq2seq checkpoint) and a tiny Llama under `root`, each with a matching tokenizer."""
    from transformers import AutoModelForCausalLM, MT5ForConditionalGeneration

    torch.manual_seed(0)
    encoder = MT5ForConditionalGeneration(ENCODER_CONFIGS["mt5"]())
    encoder.save_pretrained(root / "mt5")
    train_tiny_tokenizer(ENCODER_VOCAB, ["<pad>", "</s>", "<unk>"], None, "</s>", wrap=True).save_pretrained(root / "mt5")
    llm_config = LLM_CONFIGS["llama"]()
    llm_config.tie_word_embeddings = tie_word_embeddings
    llm = AutoModelForCausalLM.from_config(llm_config)
    llm.save_pretrained(root / "llama")
    train_tiny_tokenizer(LLM_VOCAB, ["<pad>", "<s>", "</s>", "<unk>"], "<s>", "</s>", wrap=False).save_pretrained(
        root / "llama"
    )
    return {"encoder": str(root / "mt5"), "llm": str(root / "llama")}


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The logits of a reloaded model are the trained one's, to float32 rounding. Bit-exact on an AVX2 CPU; on an Intel
    Xeon with AVX-512 a LoRA kept as peft layers, or over a quantized LLM, comes back up to 7.5e-8 off on logits of
    order 0.4 (measured), far below what a wrong or missing weight moves."""
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def free_port() -> str:
    """A port no process listens on now: each launch gets its own, so a port still held by the previous launch's
    closing sockets cannot fail the next one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_base_folders(tmp_path_factory) -> dict[str, str]:
    """Tiny mT5 and Llama folders (see `save_tiny_bases`)."""
    return save_tiny_bases(tmp_path_factory.mktemp("bases"))


@pytest.fixture(scope="session")
def tiny_layalign_folder(tiny_base_folders, tmp_path_factory) -> str:
    """A saved LayAlign-only model with its processor (math prompt), built on the tiny bases, gates non-zero."""
    from transformers import AutoTokenizer

    from modeling_layalign import LayAlignProcessor
    from modeling_layalign.training.data import MATH_PROMPT

    folder = tmp_path_factory.mktemp("layalign")
    torch.manual_seed(0)
    model = LayAlignForCausalLM.from_base_models(tiny_base_folders["encoder"], tiny_base_folders["llm"])
    set_gates(model, 0.5)
    model.save_pretrained(folder)
    LayAlignProcessor(
        tokenizer=AutoTokenizer.from_pretrained(tiny_base_folders["llm"]),
        encoder_tokenizer=AutoTokenizer.from_pretrained(tiny_base_folders["encoder"]),
        prompt_template=MATH_PROMPT,
    ).save_pretrained(folder)
    return str(folder)
