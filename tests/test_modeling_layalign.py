"""Behaviour of `LayAlignForCausalLM` on tiny random models: the method, decoding, padding, gradients, errors."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config
from transformers.generation.streamers import BaseStreamer

from modeling_layalign import LayAlignConfig, LayAlignForCausalLM

from .conftest import (
    ENCODER_CONFIGS,
    ENCODER_VOCAB,
    LLM_CONFIGS,
    LLM_PAD,
    LLM_VOCAB,
    encoder_pad_id,
    pad,
    random_ids,
    set_gates,
    tiny_model,
)


LLM_FAMILIES = sorted(LLM_CONFIGS)
ENCODERS = sorted(ENCODER_CONFIGS)
# Every LLM family with mT5, and every encoder with Llama.
FAMILY_PAIRS = [(llm, "mt5") for llm in LLM_FAMILIES] + [("llama", encoder) for encoder in ENCODERS if encoder != "mt5"]


def make_batch(model, generator, encoder_lengths=(6, 3), text_lengths=(4, 2), encoder_side="right", text_side="right"):
    """A padded batch plus the unpadded token lists it came from."""
    sources = random_ids(encoder_lengths, ENCODER_VOCAB, generator)
    texts = random_ids(text_lengths, LLM_VOCAB, generator)
    encoder_input_ids, encoder_attention_mask = pad(sources, encoder_pad_id(model), encoder_side)
    input_ids, attention_mask = pad(texts, LLM_PAD, text_side)
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_input_ids=encoder_input_ids,
        encoder_attention_mask=encoder_attention_mask,
    )
    return inputs, sources, texts


def full_sequence_mask(model, inputs) -> torch.Tensor:
    """The mask over `[BOS, mapped encoder tokens, boundary, text]` that the LLM attends with."""
    batch_size = inputs["input_ids"].shape[0]
    ones = torch.ones(batch_size, 1, dtype=torch.long)
    parts = [ones] if model.config.text_config.bos_token_id is not None else []
    if model.config.use_input_mapping:
        parts += [inputs["encoder_attention_mask"], ones]
    return torch.cat(parts + [inputs["attention_mask"]], dim=1)


def pristine_llm(model, llm: str):
    """A plain copy of the model's LLM with its own (unwrapped) attention."""
    base = AutoModelForCausalLM.from_config(LLM_CONFIGS[llm]()).eval()
    base.load_state_dict(model.llm.state_dict())
    return base


def base_llm_logits(model, base, inputs) -> torch.Tensor:
    """The plain LLM's logits on `[BOS, mapped encoder tokens, boundary, text]`, laid out as LayAlign lays it out.

    LayAlign hands the LLM each row with its padding moved to the front; the logits come back in input order.
    """
    batch_size = inputs["input_ids"].shape[0]
    embed = base.get_input_embeddings()
    encoded = model.encode(inputs["encoder_input_ids"], inputs["encoder_attention_mask"])
    parts = []
    if model.config.text_config.bos_token_id is not None:
        parts.append(embed(torch.full((batch_size, 1), model.config.text_config.bos_token_id)))
    if model.config.use_input_mapping:
        parts += [encoded.mapped_embeds, model.boundary.embedding.expand(batch_size, 1, -1)]
    embeds = torch.cat(parts + [embed(inputs["input_ids"])], dim=1)
    mask = full_sequence_mask(model, inputs)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    compact_mask, order = torch.sort(mask, dim=1, stable=True)
    logits = base(
        inputs_embeds=embeds.gather(1, order[..., None].expand_as(embeds)),
        attention_mask=compact_mask,
        position_ids=positions.gather(1, order),
    ).logits
    return logits.gather(1, order.argsort(dim=1)[..., None].expand_as(logits))


def single(inputs_or_lists, row):
    return {key: value[row : row + 1] for key, value in inputs_or_lists.items()}


@pytest.mark.parametrize("llm,encoder", FAMILY_PAIRS)
def test_zero_gates_give_the_base_llm_logits(llm, encoder, generator):
    model = tiny_model(llm, encoder)
    inputs, _, _ = make_batch(model, generator)
    base = pristine_llm(model, llm)
    real = full_sequence_mask(model, inputs).bool()
    with torch.no_grad():
        expected = base_llm_logits(model, base, inputs)
        at_init = model(**inputs).logits
        set_gates(model, 1.0)
        gated = model(**inputs).logits
    assert at_init.shape == expected.shape
    assert (at_init - expected)[real].abs().max().item() == 0.0
    assert (gated - expected)[real].abs().max().item() > 1e-3


@pytest.mark.parametrize("llm,encoder", FAMILY_PAIRS)
def test_incremental_decoding_matches_full_forward(llm, encoder, generator):
    model = tiny_model(llm, encoder)
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator, text_lengths=(7, 7))
    prompt_len = 4
    with torch.no_grad():
        full = model(**inputs).logits
        encoded = model.encode(inputs["encoder_input_ids"], inputs["encoder_attention_mask"])
        step = model(
            input_ids=inputs["input_ids"][:, :prompt_len],
            attention_mask=inputs["attention_mask"][:, :prompt_len],
            encoder_input_ids=inputs["encoder_input_ids"],
            encoder_attention_mask=inputs["encoder_attention_mask"],
            use_cache=True,
        )
        cache = step.cache
        real = full_sequence_mask(model, inputs).bool()[:, : step.logits.shape[1]]
        worst = (step.logits - full[:, : step.logits.shape[1]])[real].abs().max().item()
        offset = full.shape[1] - inputs["input_ids"].shape[1]
        for position in range(prompt_len, 7):
            # Alternate the two ways of feeding the encoder side to a decoding step.
            encoder_side = (
                dict(fused_states=encoded.fused_states)
                if position % 2
                else dict(encoder_input_ids=inputs["encoder_input_ids"])
            )
            step = model(
                input_ids=inputs["input_ids"][:, position : position + 1],
                attention_mask=inputs["attention_mask"][:, : position + 1],
                encoder_attention_mask=inputs["encoder_attention_mask"],
                cache=cache,
                use_cache=True,
                **encoder_side,
            )
            cache = step.cache
            worst = max(worst, (step.logits[:, -1] - full[:, offset + position]).abs().max().item())
    assert worst <= 1e-5, worst


def test_past_key_values_is_accepted_as_the_old_name_of_cache(generator):
    model = tiny_model()
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator, text_lengths=(3, 3))
    with torch.no_grad():
        full = model(**inputs).logits
        first = model(**{**inputs, "input_ids": inputs["input_ids"][:, :2], "attention_mask": inputs["attention_mask"][:, :2]}, use_cache=True)
        second = model(
            input_ids=inputs["input_ids"][:, 2:],
            attention_mask=inputs["attention_mask"],
            encoder_input_ids=inputs["encoder_input_ids"],
            encoder_attention_mask=inputs["encoder_attention_mask"],
            past_key_values=first.cache,
        )
    torch.testing.assert_close(second.logits[:, -1], full[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("llm,encoder", FAMILY_PAIRS)
@pytest.mark.parametrize("encoder_side", ["left", "right"])
@pytest.mark.parametrize("text_side", ["left", "right"])
def test_logits_do_not_depend_on_padding_or_batch(llm, encoder, encoder_side, text_side, generator):
    model = tiny_model(llm, encoder)
    set_gates(model, 0.7)
    if encoder_side == "left" and encoder == "xlm-roberta":
        pytest.skip("XLM-R's absolute positions follow its tokenizer's right padding")
    inputs, sources, texts = make_batch(model, generator, encoder_side=encoder_side, text_side=text_side)
    with torch.no_grad():
        batched = model(**inputs).logits
        mask = full_sequence_mask(model, inputs).bool()
        worst = 0.0
        for row in range(2):
            alone = model(
                input_ids=torch.tensor([texts[row]]), encoder_input_ids=torch.tensor([sources[row]])
            ).logits[0]
            worst = max(worst, (batched[row][mask[row]] - alone).abs().max().item())
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("llm,encoder", FAMILY_PAIRS)
def test_greedy_generation_does_not_depend_on_padding_or_batch(llm, encoder, generator):
    model = tiny_model(llm, encoder)
    set_gates(model, 0.7)
    inputs, sources, texts = make_batch(model, generator, text_side="left")
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=LLM_PAD, eos_token_id=None)
    batched = model.generate(**inputs, **settings)
    prompt_len = inputs["input_ids"].shape[1]
    for row in range(2):
        alone = model.generate(
            input_ids=torch.tensor([texts[row]]), encoder_input_ids=torch.tensor([sources[row]]), **settings
        )
        assert batched[row, prompt_len:].tolist() == alone[0, len(texts[row]) :].tolist()
        assert batched[row, :prompt_len][inputs["attention_mask"][row].bool()].tolist() == texts[row]


def test_generation_without_prompt_starts_after_the_boundary(generator):
    model = tiny_model()
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator)
    generated = model.generate(
        encoder_input_ids=inputs["encoder_input_ids"],
        encoder_attention_mask=inputs["encoder_attention_mask"],
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=None,
    )
    assert generated.shape == (2, 5)
    with torch.no_grad():
        first = model(
            input_ids=torch.zeros(2, 0, dtype=torch.long),
            encoder_input_ids=inputs["encoder_input_ids"],
            encoder_attention_mask=inputs["encoder_attention_mask"],
        ).logits[:, -1]
    assert generated[:, 0].tolist() == first.argmax(-1).tolist()


def test_greedy_generation_follows_the_argmax_of_forward(generator):
    model = tiny_model("qwen3")
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator, text_side="left")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None)
    sequence = generated
    with torch.no_grad():
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 4, dtype=torch.long)], dim=1)
        logits = model(
            input_ids=sequence,
            attention_mask=mask,
            encoder_input_ids=inputs["encoder_input_ids"],
            encoder_attention_mask=inputs["encoder_attention_mask"],
        ).logits
    prompt_len = inputs["input_ids"].shape[1]
    predicted = logits[:, -5:-1].argmax(-1)
    assert predicted.tolist() == generated[:, prompt_len:].tolist()


@pytest.mark.parametrize("llm,encoder", FAMILY_PAIRS)
def test_beams_and_return_sequences_stay_with_their_example(llm, encoder, generator):
    model = tiny_model(llm, encoder)
    set_gates(model, 0.7)
    inputs, sources, texts = make_batch(model, generator, text_side="left")
    settings = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None)
    batched = model.generate(**inputs, **settings)
    assert batched.shape == (4, inputs["input_ids"].shape[1] + 5)
    prompt_len = inputs["input_ids"].shape[1]
    for row in range(2):
        alone = model.generate(input_ids=torch.tensor([texts[row]]), encoder_input_ids=torch.tensor([sources[row]]), **settings)
        assert batched[2 * row : 2 * row + 2, prompt_len:].tolist() == alone[:, len(texts[row]) :].tolist()


@pytest.mark.parametrize("llm", ["llama", "qwen3", "gemma2"])
def test_a_static_cache_generates_what_the_dynamic_cache_generates(llm, generator):
    model = tiny_model(llm)
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator, text_side="left")
    greedy = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    dynamic = model.generate(**inputs, **greedy)
    static = model.generate(**inputs, **greedy, cache_implementation="static")
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    for static_scores, dynamic_scores in zip(static.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(static_scores, dynamic_scores, rtol=1e-5, atol=1e-5)
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None)
    assert model.generate(**inputs, **beams, cache_implementation="static").tolist() == model.generate(**inputs, **beams).tolist()
    no_prompt = dict(encoder_input_ids=inputs["encoder_input_ids"], encoder_attention_mask=inputs["encoder_attention_mask"])
    assert model.generate(**no_prompt, max_new_tokens=5, do_sample=False, eos_token_id=None, cache_implementation="static").tolist() == (
        model.generate(**no_prompt, max_new_tokens=5, do_sample=False, eos_token_id=None).tolist()
    )


def decoding_step_shapes(model, inputs, **settings) -> list[tuple]:
    """The shapes of every tensor `forward` receives at each step of `generate` (a dict mask by its entries)."""
    steps = []

    def record(module, args, kwargs):
        shapes = []
        for name, value in sorted(kwargs.items()):
            tensors = value.items() if isinstance(value, dict) else [("", value)]
            shapes += [(name, key, tuple(t.shape)) for key, t in tensors if isinstance(t, torch.Tensor)]
        steps.append(tuple(shapes))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model.generate(**inputs, **settings)
    finally:
        hook.remove()
    return steps


@pytest.mark.parametrize("llm", ["llama", "gemma2"])
def test_static_cache_decoding_steps_all_have_the_same_shapes(llm, generator):
    """What lets `generate` compile one decoding step for all: the LLM's mask arrives prepared over the whole cache."""
    model = tiny_model(llm)
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator, text_side="left")
    steps = decoding_step_shapes(model, inputs, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert len(steps) == 5
    assert len(set(steps[1:])) == 1
    # (A dynamic cache's text mask grows by one column per step.)
    assert len(set(decoding_step_shapes(model, inputs, max_new_tokens=5, do_sample=False)[1:])) == 4


def test_a_compiled_decoding_step_is_one_graph_and_generates_the_same(generator):
    """`generate` compiles the decoding step when the cache is static; `fullgraph=True` fails on any graph break and
    `error_on_recompile` on a recompilation. (The "eager" backend traces without generating code, in seconds.)"""
    from transformers import CompileConfig

    model = tiny_model("qwen3")
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator, text_side="left")
    settings = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    compile_config = CompileConfig(fullgraph=True, backend="eager")
    compile_config._compile_all_devices = True  # `generate` compiles on accelerators only, unless told so
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = model.generate(**inputs, **settings, cache_implementation="static", compile_config=compile_config)
    torch._dynamo.reset()
    assert compiled.tolist() == model.generate(**inputs, **settings).tolist()


def test_beam_search_scores_are_the_models_own_log_probabilities(generator):
    """Each example's best beam, scored as the sum of its tokens' log-probabilities (`length_penalty=0`), equals what
    one forward pass of the model gives that sequence: every beam read its own example's fused keys and values."""
    model = tiny_model("mistral")
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator, text_side="left")
    out = model.generate(
        **inputs, max_new_tokens=5, num_beams=3, do_sample=False, eos_token_id=None, length_penalty=0.0,
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    prompt_len = inputs["input_ids"].shape[1]
    generated = out.sequences[:, prompt_len:]
    with torch.no_grad():
        logits = model(
            input_ids=out.sequences,
            attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(generated)], dim=1),
            encoder_input_ids=inputs["encoder_input_ids"],
            encoder_attention_mask=inputs["encoder_attention_mask"],
        ).logits.float()
    first = model.num_prefix_positions(inputs["encoder_input_ids"].shape[1]) + prompt_len - 1
    log_probs = logits[:, first : first + generated.shape[1]].log_softmax(-1).gather(-1, generated[..., None])[..., 0]
    torch.testing.assert_close(out.sequences_scores, log_probs.sum(-1), rtol=1e-4, atol=1e-4)


def test_sampling_with_a_seed_is_reproducible(generator):
    model = tiny_model("qwen2")
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator, text_side="left")
    settings = dict(max_new_tokens=8, do_sample=True, top_k=0, temperature=5.0, num_return_sequences=3, eos_token_id=None)
    torch.manual_seed(7)
    first = model.generate(**inputs, **settings)
    torch.manual_seed(7)
    second = model.generate(**inputs, **settings)
    torch.manual_seed(8)
    third = model.generate(**inputs, **settings)
    assert first.shape == (6, inputs["input_ids"].shape[1] + 8)
    assert first.tolist() == second.tolist()
    assert first.tolist() != third.tolist()


def test_streamer_receives_the_generated_tokens(generator):
    class Recorder(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.chunks.append("end")

    model = tiny_model()
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator)
    one = single(inputs, 0)
    recorder = Recorder()
    generated = model.generate(**one, max_new_tokens=4, do_sample=False, eos_token_id=None, streamer=recorder)
    assert recorder.chunks[-1] == "end"
    streamed_new = [chunk[0] for chunk in recorder.chunks[1:-1]]
    assert streamed_new == generated[0, one["input_ids"].shape[1] :].tolist()


def test_encoder_runs_once_per_generate_call(generator):
    model = tiny_model()
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator, text_side="left")
    calls = []
    handle = model.encoder.register_forward_hook(lambda module, args, output: calls.append(1))
    model.generate(**inputs, max_new_tokens=6, num_beams=2, do_sample=False, eos_token_id=None)
    handle.remove()
    assert len(calls) == 1


def test_two_models_in_two_threads_do_not_interfere(generator):
    models = [tiny_model(seed=0), tiny_model(seed=1)]
    set_gates(models[0], 0.5)
    set_gates(models[1], -0.5)
    inputs, _, _ = make_batch(models[0], generator)
    with torch.no_grad():
        expected = [model(**inputs).logits for model in models]
    results = {}

    def run(index):
        with torch.no_grad():
            results[index] = [models[index](**inputs).logits for _ in range(5)]

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(2):
        for logits in results[index]:
            torch.testing.assert_close(logits, expected[index], atol=0, rtol=0)


@pytest.mark.parametrize("llm,encoder", [("llama", "mt5"), ("gemma2", "xlm-roberta")])
def test_a_training_step_compiles_as_one_graph_with_the_same_gradients(llm, encoder, generator):
    """What `TrainingArguments(torch_compile=True)` needs: no graph break in `forward` (`fullgraph=True`; the
    "eager" backend traces without generating code), and the same loss and gradients as eager."""
    model = tiny_model(llm, encoder)
    set_gates(model, 0.5)
    model.eval()  # no dropout, so that both passes compute the same
    inputs, _, _ = make_batch(model, generator)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def loss_and_gradients(forward):
        model.zero_grad()
        loss = forward(**inputs, labels=labels).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_gradients = loss_and_gradients(model)  # (also installs transformers' output-capturing hooks)
    torch._dynamo.reset()
    compiled_loss, compiled_gradients = loss_and_gradients(torch.compile(model, fullgraph=True, backend="eager"))
    torch._dynamo.reset()
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert compiled_gradients.keys() == eager_gradients.keys() and len(eager_gradients) > 0
    for name, gradient in eager_gradients.items():
        torch.testing.assert_close(compiled_gradients[name], gradient, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("llm,encoder", FAMILY_PAIRS)
def test_gradients_reach_exactly_the_layalign_modules(llm, encoder, generator):
    model = tiny_model(llm, encoder)
    set_gates(model, 0.5)
    model.train()
    inputs, _, _ = make_batch(model, generator)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model(**inputs, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        is_layalign = model.is_layalign_key(name)
        assert parameter.requires_grad == is_layalign, name
        if is_layalign:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_gradient_checkpointing_gives_the_same_gradients(generator):
    model = tiny_model(encoder_dropout_in_training=False)
    set_gates(model, 0.5)
    model.train()
    inputs, _, _ = make_batch(model, generator)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    expected = {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.requires_grad}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.llm.is_gradient_checkpointing
    model(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def test_zero_gates_still_pass_gradient_to_the_gates(generator):
    model = tiny_model()
    model.train()
    inputs, _, _ = make_batch(model, generator)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert (model.gates.weight.grad.abs() > 0).all()


def test_trainable_parts_follow_the_config():
    model = tiny_model(train_llm=True)
    assert all(parameter.requires_grad for parameter in model.llm.parameters())
    assert not any(parameter.requires_grad for parameter in model.encoder.parameters())
    assert model.default_checkpoint_format() == "full"


def test_loss_covers_only_label_positions(generator):
    model = tiny_model()
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator, text_lengths=(5, 5))
    labels = inputs["input_ids"].clone()
    labels[:, :3] = -100
    with torch.no_grad():
        output = model(**inputs, labels=labels)
    offset = output.logits.shape[1] - labels.shape[1]
    predictions = output.logits[:, offset - 1 : -1]
    expected = torch.nn.functional.cross_entropy(predictions.reshape(-1, LLM_VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)
    changed = inputs["input_ids"].clone()
    changed[:, 1] = 5
    with torch.no_grad():
        other = model(**{**inputs, "input_ids": changed}, labels=labels)
    assert not torch.equal(other.loss, output.loss)


def test_first_target_token_is_predicted_from_the_boundary(generator):
    model = tiny_model()
    inputs, _, _ = make_batch(model, generator, text_lengths=(1, 1))
    labels = inputs["input_ids"]
    with torch.no_grad():
        output = model(**inputs, labels=labels)
    boundary_logits = output.logits[:, -2]
    expected = torch.nn.functional.cross_entropy(boundary_logits, labels[:, 0])
    torch.testing.assert_close(output.loss, expected)


def test_mindmerger_ablation_is_the_llm_with_a_mapped_prefix(generator):
    model = tiny_model(use_layer_fusion=False)
    assert model.fusion is None and model.gates is None
    inputs, _, _ = make_batch(model, generator)
    with torch.no_grad():
        assert model.encode(inputs["encoder_input_ids"], inputs["encoder_attention_mask"]).fused_states is None
        expected = base_llm_logits(model, pristine_llm(model, "llama"), inputs)
        actual = model(**inputs).logits
    assert (actual - expected)[full_sequence_mask(model, inputs).bool()].abs().max().item() == 0.0


def test_without_input_mapping_the_llm_reads_bos_and_text_and_the_fused_branch_alone(generator):
    model = tiny_model(use_input_mapping=False)
    assert model.input_mapping is None and model.boundary is None
    inputs, _, _ = make_batch(model, generator)
    assert model.num_prefix_positions(inputs["encoder_input_ids"].shape[1]) == 1
    # With the gates at zero the fused branch adds nothing: the logits are the LLM's own on [BOS, text].
    bos = torch.full((2, 1), model.config.text_config.bos_token_id)
    with torch.no_grad():
        logits = model(**inputs).logits
        alone = pristine_llm(model, "llama")(
            input_ids=torch.cat([bos, inputs["input_ids"]], dim=1),
            attention_mask=torch.cat([torch.ones_like(bos), inputs["attention_mask"]], dim=1),
        ).logits
        set_gates(model, 0.7)
        fused = model(**inputs).logits
    real = torch.cat([torch.ones_like(bos), inputs["attention_mask"]], dim=1).bool()
    torch.testing.assert_close(logits[real], alone[real], rtol=1e-5, atol=1e-5)
    assert (fused[real] - alone[real]).abs().max() > 1e-3  # the source reaches the LLM through the fused branch


def input_and_encoder_output(model, module, inputs) -> tuple[torch.Tensor, object]:
    """What `module` receives in a forward pass of `model` on `inputs`, and the encoder's output with every hidden state."""
    received = []
    handle = module.register_forward_pre_hook(lambda module, args: received.append(args[0]))
    with torch.no_grad():
        model(**inputs)
        encoded = model.encoder(
            input_ids=inputs["encoder_input_ids"], attention_mask=inputs["encoder_attention_mask"], output_hidden_states=True
        )
    handle.remove()
    return received[0], encoded


def test_the_configured_encoder_layers_are_the_ones_fused(generator):
    model = tiny_model(adapted_llm_layers=[1], fused_encoder_layers=[0, 2])
    assert model.fusion.layer_mix.in_features == 2 and model.fusion.layer_mix.out_features == 2
    inputs, _, _ = make_batch(model, generator)
    fused_input, encoded = input_and_encoder_output(model, model.fusion, inputs)
    states = encoded.hidden_states
    # (batch, encoder_len, d_enc, layers): the embedding output and the output of the second (last) encoder layer.
    torch.testing.assert_close(fused_input, torch.stack([states[0], states[2]], dim=-1), rtol=0, atol=0)


@pytest.mark.parametrize("encoder", ["mt5", "xlm-roberta"])
@pytest.mark.parametrize("mapped_encoder_layer", [None, 1])
def test_the_input_mapping_reads_the_configured_encoder_layer(encoder, mapped_encoder_layer, generator):
    model = tiny_model(encoder=encoder, mapped_encoder_layer=mapped_encoder_layer)
    inputs, _, _ = make_batch(model, generator)
    mapped_input, encoded = input_and_encoder_output(model, model.input_mapping, inputs)
    # The final output by default (the paper's choice), else that hidden state (0 is the embedding output).
    expected = encoded.last_hidden_state if mapped_encoder_layer is None else encoded.hidden_states[mapped_encoder_layer]
    torch.testing.assert_close(mapped_input, expected, rtol=0, atol=0)
    assert not torch.equal(encoded.hidden_states[1], encoded.last_hidden_state)


def attention_outputs(model, inputs, gates: list[float]) -> list[torch.Tensor]:
    """Each LLM layer's attention output (before the residual) with the gates set to `gates`."""
    seen = []
    handles = [
        layer.self_attn.register_forward_hook(lambda module, args, output: seen.append(output[0]))
        for layer in model.llm.model.layers
    ]
    with torch.no_grad():
        model.gates.weight.copy_(torch.tensor(gates))
        model(**inputs)
    for handle in handles:
        handle.remove()
    return seen


def test_each_gate_scales_its_own_layers_fused_branch(generator):
    model = tiny_model(adapted_llm_layers=[0, 1])
    inputs, _, _ = make_batch(model, generator)
    closed = attention_outputs(model, inputs, [0.0, 0.0])
    first, first_doubled = attention_outputs(model, inputs, [0.5, 0.0]), attention_outputs(model, inputs, [1.0, 0.0])
    # The first gate changes the first layer's attention by a branch that is linear in it (the gate multiplies the
    # fused branch's output, as in the reference code), ...
    branch = first[0] - closed[0]
    assert branch.abs().max() > 1e-3
    torch.testing.assert_close(first_doubled[0] - closed[0], 2 * branch, rtol=1e-4, atol=1e-6)
    # ... and the second gate changes nothing before the second layer.
    second = attention_outputs(model, inputs, [0.0, 0.5])
    torch.testing.assert_close(second[0], closed[0], rtol=0, atol=0)
    assert (second[1] - closed[1]).abs().max() > 1e-3


def test_selected_layers_are_the_ones_adapted(generator):
    model = tiny_model(adapted_llm_layers=[1], fused_encoder_layers=[0, 2])
    assert model.gates.adapted_layers == [1] and model.gates.weight.shape == (1,)
    inputs, _, _ = make_batch(model, generator)
    closed, opened = attention_outputs(model, inputs, [0.0]), attention_outputs(model, inputs, [1.0])
    # Layer 0 is not adapted: its output ignores the gate of layer 1, which changes layer 1's.
    torch.testing.assert_close(opened[0], closed[0], atol=0, rtol=0)
    assert (opened[1] - closed[1]).abs().max() > 1e-3


def test_mlp_fusion_adds_a_refining_layer(generator):
    model = tiny_model(fusion_structure="mlp")
    set_gates(model, 0.7)
    assert model.fusion.refine is not None
    inputs, _, _ = make_batch(model, generator)
    with torch.no_grad():
        before = model(**inputs).logits
        model.fusion.refine.weight.mul_(2)
        after = model(**inputs).logits
    assert (before - after).abs().max() > 1e-5


def test_user_chosen_attention_implementation_keeps_the_fused_branch(generator):
    model = tiny_model()
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator)
    with torch.no_grad():
        sdpa = model(**inputs).logits
        model.set_attn_implementation({"text_config": "eager"})
        assert model.llm.config._attn_implementation == "eager"
        eager = model(**inputs).logits
    assert model.llm.config._attn_implementation == "layalign_eager"
    real = full_sequence_mask(model, inputs).bool()
    torch.testing.assert_close(eager[real], sdpa[real], atol=1e-5, rtol=0)


def test_encoder_dropout_switch():
    model = tiny_model()
    model.train()
    assert model.encoder.training
    model = tiny_model(encoder_dropout_in_training=False)
    model.train()
    assert not model.encoder.training and model.llm.training


def test_paper_pair_has_the_papers_trainable_parameter_count():
    from transformers import LlamaConfig, MT5Config

    encoder = MT5Config(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, vocab_size=250112)
    llm = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    with torch.device("meta"):
        model = LayAlignForCausalLM(LayAlignConfig(encoder_config=encoder, text_config=llm))
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    assert round(trainable / 1e6, 2) == 33.57


# -- bad input ---------------------------------------------------------------------------------------------------------


def test_missing_encoder_input_ids_is_an_error(generator):
    model = tiny_model()
    inputs, _, _ = make_batch(model, generator)
    with pytest.raises(ValueError, match="encoder_input_ids"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="encoder_input_ids"):
        model.generate(input_ids=inputs["input_ids"], max_new_tokens=2)


def test_generate_refuses_a_second_source_of_the_encoder_states(generator):
    model = tiny_model()
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator, text_side="left")
    other = model.encode(inputs["encoder_input_ids"].flip(0), inputs["encoder_attention_mask"].flip(0))
    for name, value in (("fused_states", other.fused_states), ("mapped_encoder_embeds", other.mapped_embeds)):
        with pytest.raises(ValueError, match=f"`generate` encodes `encoder_input_ids` itself; `{name}` would be a second"):
            model.generate(**inputs, max_new_tokens=2, **{name: value})


def test_mismatched_batch_sizes_are_an_error(generator):
    model = tiny_model()
    inputs, _, _ = make_batch(model, generator)
    with pytest.raises(ValueError, match="2 examples but the LLM inputs hold 1"):
        model(input_ids=inputs["input_ids"][:1], encoder_input_ids=inputs["encoder_input_ids"])


def test_wrong_dtypes_and_shapes_are_errors(generator):
    model = tiny_model()
    inputs, _, _ = make_batch(model, generator)
    with pytest.raises(ValueError, match="`encoder_input_ids` must hold integer token ids"):
        model(input_ids=inputs["input_ids"], encoder_input_ids=inputs["encoder_input_ids"].float())
    with pytest.raises(ValueError, match="`input_ids` must hold integer token ids"):
        model(input_ids=inputs["input_ids"].float(), encoder_input_ids=inputs["encoder_input_ids"])
    with pytest.raises(ValueError, match="`encoder_input_ids` must be a 2-D tensor"):
        model(input_ids=inputs["input_ids"], encoder_input_ids=inputs["encoder_input_ids"][0])
    with pytest.raises(ValueError, match="`encoder_attention_mask` has shape"):
        model(
            input_ids=inputs["input_ids"],
            encoder_input_ids=inputs["encoder_input_ids"],
            encoder_attention_mask=inputs["encoder_attention_mask"][:, :2],
        )
    with pytest.raises(ValueError, match="exactly one of `input_ids` and `inputs_embeds`"):
        model(encoder_input_ids=inputs["encoder_input_ids"])


def test_text_masks_and_labels_of_the_wrong_shape_are_errors(generator):
    model = tiny_model()
    inputs, _, _ = make_batch(model, generator)
    short_mask = {**inputs, "attention_mask": inputs["attention_mask"][:, :-1]}
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(2, 3\), but the text needs \(2, 4\)"):
        model(**short_mask)
    with pytest.raises(ValueError, match=r"`labels` has shape \(2, 3\); it must match the text, \(2, 4\)"):
        model(**inputs, labels=inputs["input_ids"][:, :3])
    first = model(**inputs, use_cache=True)
    step = dict(
        input_ids=inputs["input_ids"][:, :1], encoder_input_ids=inputs["encoder_input_ids"],
        encoder_attention_mask=inputs["encoder_attention_mask"], cache=first.cache,
    )  # fmt: skip
    with pytest.raises(ValueError, match="after the text already in the cache"):
        model(**step, attention_mask=inputs["attention_mask"])  # one column short: the new token is missing


def test_labels_without_a_target_token_warn(generator, caplog):
    model = tiny_model()
    inputs, _, _ = make_batch(model, generator)
    with caplog.at_level("WARNING"):
        model(**inputs, labels=torch.full_like(inputs["input_ids"], -100))
    assert "hold no target token" in caplog.text


def test_sources_outside_the_encoders_range_are_errors(generator):
    model = tiny_model()
    inputs, _, _ = make_batch(model, generator)
    with pytest.raises(ValueError, match="`encoder_input_ids` holds no token"):
        model(input_ids=inputs["input_ids"], encoder_input_ids=inputs["encoder_input_ids"][:, :0])
    xlmr = tiny_model(encoder="xlm-roberta")
    limit = xlmr.config.encoder_config.max_position_embeddings - xlmr.config.encoder_config.pad_token_id - 1
    text = inputs["input_ids"][:1]
    xlmr(input_ids=text, encoder_input_ids=torch.full((1, limit), 5))  # the longest source its positions allow
    with pytest.raises(ValueError, match=f"holds {limit + 1} tokens per source, but the encoder's position table holds {limit}"):
        xlmr(input_ids=text, encoder_input_ids=torch.full((1, limit + 1), 5))


def test_return_dict_false_gives_a_tuple(generator):
    model = tiny_model()
    inputs, _, _ = make_batch(model, generator)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    output = model(**inputs, labels=labels)
    loss, logits = model(**inputs, labels=labels, return_dict=False)[:2]
    torch.testing.assert_close(loss, output.loss)
    torch.testing.assert_close(logits, output.logits)


def test_unsupported_families_are_named():
    with pytest.raises(ValueError, match=r"LLM family 'gpt2'.*supported: \['gemma2'"):
        LayAlignForCausalLM(
            LayAlignConfig(encoder_config=ENCODER_CONFIGS["mt5"](), text_config=GPT2Config(n_embd=32, n_layer=2, n_head=4))
        )
    with pytest.raises(ValueError, match="encoder family 'gpt2'"):
        LayAlignForCausalLM(
            LayAlignConfig(encoder_config=GPT2Config(n_embd=32, n_layer=2, n_head=4), text_config=LLM_CONFIGS["llama"]())
        )
