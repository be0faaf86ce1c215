"""On a CUDA device: bfloat16 against float32, compiled decoding with a static cache, SDPA against eager, flash
attention, and a bfloat16 training run.

Run with `pytest -m gpu` (what `benchmarks/gpu_check.sh` does); skipped where no CUDA device is present.
"""

import pytest
import torch

from .conftest import set_gates, tiny_model


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _inputs(model, batch: int = 4, encoder_len: int = 12, text_len: int = 10) -> dict:
    """Random ids with left-padded text and right-padded sources, as the processor makes them for generation."""
    generator = torch.Generator().manual_seed(0)
    config = model.config
    encoder_ids = torch.randint(4, config.encoder_config.vocab_size, (batch, encoder_len), generator=generator)
    encoder_mask = torch.ones_like(encoder_ids)
    encoder_mask[1, -4:] = 0
    input_ids = torch.randint(4, config.text_config.vocab_size, (batch, text_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, :3] = 0
    inputs = dict(
        encoder_input_ids=encoder_ids, encoder_attention_mask=encoder_mask, input_ids=input_ids,
        attention_mask=attention_mask,
    )  # fmt: skip
    return {name: value.cuda() for name, value in inputs.items()}


def _cuda_model(llm: str = "llama", dtype: torch.dtype = torch.float32):
    model = tiny_model(llm)
    set_gates(model, 0.5)
    return model.to("cuda", dtype=dtype)


@pytest.mark.parametrize("llm", ["llama", "gemma2"])
def test_bfloat16_forward_follows_float32(llm):
    reference, half = _cuda_model(llm), _cuda_model(llm, torch.bfloat16)
    inputs = _inputs(reference)
    real = inputs["attention_mask"].bool()  # padded text positions have no meaningful logits
    with torch.no_grad():
        expected = reference(**inputs).logits[:, -10:][real]
        got = half(**inputs).logits[:, -10:][real].float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_bfloat16_generation_follows_float32():
    """Greedy tokens of float32, re-read by the bfloat16 model: its argmax agrees at nearly every new position."""
    reference, half = _cuda_model(), _cuda_model(dtype=torch.bfloat16)
    inputs = _inputs(reference)
    new_tokens = 8
    with torch.no_grad():
        generated = reference.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        assert half.generate(**inputs, max_new_tokens=new_tokens, do_sample=False).shape[0] == generated.shape[0]
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(generated[:, -new_tokens:])], dim=1)
        rereading = {**inputs, "input_ids": generated, "attention_mask": mask}
        predicted = half(**rereading).logits[:, -new_tokens - 1 : -1].argmax(-1)
    assert (predicted == generated[:, -new_tokens:]).float().mean() > 0.85


def test_compiled_static_cache_generation_equals_the_dynamic_cache():
    """On a GPU a static cache makes `generate` compile the decoding step (CUDA graphs): the same tokens."""
    model = _cuda_model("qwen3")
    inputs = _inputs(model)
    settings = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        dynamic = model.generate(**inputs, **settings)
        for _ in range(2):  # the second call replays the compiled step
            static = model.generate(**inputs, **settings, cache_implementation="static")
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    for static_scores, dynamic_scores in zip(static.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(static_scores, dynamic_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("llm", ["llama", "qwen3", "gemma2"])
def test_sdpa_equals_eager_on_the_gpu(llm):
    model = _cuda_model(llm)
    inputs = _inputs(model)
    with torch.no_grad():
        sdpa = model(**inputs).logits[:, -10:]
        model.set_attn_implementation({"text_config": "eager"})
        eager = model(**inputs).logits[:, -10:]
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(eager[real], sdpa[real], atol=1e-4, rtol=0)


def test_flash_attention_equals_sdpa_in_bfloat16():
    pytest.importorskip("flash_attn")
    model = _cuda_model(dtype=torch.bfloat16)
    inputs = _inputs(model)
    with torch.no_grad():
        sdpa = model(**inputs).logits[:, -10:].float()
        model.set_attn_implementation({"text_config": "flash_attention_2"})
        flash = model(**inputs).logits[:, -10:].float()
    real = inputs["attention_mask"].bool()
    assert (flash[real] - sdpa[real]).abs().max() < 0.05 * sdpa.abs().max()


def _training_losses(bases_dtype: torch.dtype, steps: int = 20) -> list[float]:
    """AdamW over the LayAlign modules (float32) on one batch; autocast when the bases are not float32."""
    model = _cuda_model()
    model.encoder.to(bases_dtype)
    model.llm.to(bases_dtype)
    model.train()
    inputs = _inputs(model)
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    assert all(parameter.dtype == torch.float32 for parameter in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bases_dtype != torch.float32):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_bfloat16_training_lowers_the_loss_as_float32_does():
    """Twenty steps on tiny models: the loss falls (a frozen random LLM moves slowly: about 0.09 nats), and the
    bfloat16 curve stays within bf16 noise of the float32 one at every step."""
    full, half = _training_losses(torch.float32), _training_losses(torch.bfloat16)
    assert half[-1] < half[0] - 0.05
    assert max(abs(a - b) for a, b in zip(half, full)) < 0.02


def test_a_four_bit_nf4_llm_trains_and_reloads_quantized(tmp_path):
    """QLoRA's quantization (`--quantize nf4`), which needs the GPU: LayAlign over a 4-bit LLM of width 64 (a multiple
    of NF4's block of 64 weights) trains its own modules, saves LayAlign-only and reloads 4-bit with equal logits."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, MT5EncoderModel

    from modeling_layalign import LayAlignForCausalLM

    from .conftest import ENCODER_CONFIGS, LLM_VOCAB

    torch.manual_seed(0)
    MT5EncoderModel(ENCODER_CONFIGS["mt5"]()).save_pretrained(tmp_path / "encoder")
    llm_config = LlamaConfig(vocab_size=LLM_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)  # fmt: skip
    AutoModelForCausalLM.from_config(llm_config).save_pretrained(tmp_path / "llm")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    model = LayAlignForCausalLM.from_base_models(
        tmp_path / "encoder", tmp_path / "llm", encoder_kwargs={"device_map": "cuda"},
        llm_kwargs={"quantization_config": nf4, "device_map": "cuda"},
    )  # fmt: skip
    assert model.is_loaded_in_4bit and type(model.llm.get_decoder().layers[0].self_attn.k_proj).__name__ == "Linear4bit"
    set_gates(model, 0.5)
    inputs = {name: value for name, value in _inputs(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(parameter.grad is None for parameter in model.llm.parameters())
    model.eval().save_pretrained(tmp_path / "saved")
    reloaded = LayAlignForCausalLM.from_pretrained(tmp_path / "saved", device_map="cuda")
    assert type(reloaded.llm.get_decoder().layers[0].self_attn.k_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
