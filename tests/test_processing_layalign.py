"""`LayAlignProcessor`: token layout per stage, padding, truncation, saving and loading."""

import json

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer

from modeling_layalign import LayAlignForCausalLM, LayAlignProcessor


@pytest.fixture(scope="module")
def processor(tiny_base_folders) -> LayAlignProcessor:
    return LayAlignProcessor(
        tokenizer=AutoTokenizer.from_pretrained(tiny_base_folders["llm"]),
        encoder_tokenizer=AutoTokenizer.from_pretrained(tiny_base_folders["encoder"]),
        encoder_text_prefix="query: ",
        max_source_length=32,
        max_length=64,
    )


def ids(tokenizer, text: str, **kwargs) -> list[int]:
    return tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"]


def test_stage_one_layout_has_no_prompt_and_loss_on_the_whole_target(processor):
    example = processor.encode_example("Natalia hat 48 Clips.", "Natalia sold 48 clips.")
    target = ids(processor.tokenizer, "Natalia sold 48 clips.") + [processor.tokenizer.eos_token_id]
    assert example["input_ids"] == target
    assert example["labels"] == target
    assert example["encoder_input_ids"] == processor.encoder_tokenizer("query: Natalia hat 48 Clips.")["input_ids"]
    assert example["encoder_input_ids"][-1] == processor.encoder_tokenizer.eos_token_id
    assert processor.tokenizer.bos_token_id not in example["input_ids"]


def test_stage_two_layout_masks_the_prompt(processor):
    example = processor.encode_example("Bata wa Janet", "The answer is: 72", "Instruction: Bata wa Janet Response:")
    prompt = ids(processor.tokenizer, "Instruction: Bata wa Janet Response:")
    target = ids(processor.tokenizer, "The answer is: 72") + [processor.tokenizer.eos_token_id]
    assert example["input_ids"] == prompt + target
    assert example["labels"] == [-100] * len(prompt) + target


def test_prompt_template_fills_in_the_source(processor):
    templated = LayAlignProcessor(
        tokenizer=processor.tokenizer, encoder_tokenizer=processor.encoder_tokenizer, prompt_template="Q: {query} A:"
    )
    example = templated.encode_example("Weng earns $12")
    assert example["input_ids"] == ids(templated.tokenizer, "Q: Weng earns $12 A:")
    assert "labels" not in example
    # An explicit empty prompt (stage 1) overrides the template.
    assert templated.encode_example("Weng earns $12", "x", "")["input_ids"] == ids(templated.tokenizer, "x") + [2]


def test_training_batches_pad_right_and_inference_batches_pad_left(processor):
    sources = ["Natalia hat 48 Clips an ihre Freunde verkauft.", "Bata"]
    training = processor(sources, targets=["Natalia sold clips to her friends in April.", "Janet"])
    pad = processor.tokenizer.pad_token_id
    assert training["attention_mask"][1].tolist()[-1] == 0 and training["attention_mask"][1].tolist()[0] == 1
    assert (training["labels"][training["attention_mask"] == 0] == -100).all()
    assert (training["input_ids"][training["attention_mask"] == 0] == pad).all()
    assert training["encoder_attention_mask"][1].tolist()[-1] == 0
    inference = processor(sources, prompts=["Instruction: long prompt with many words here", "Q"])
    assert "labels" not in inference
    assert inference["attention_mask"][1].tolist()[0] == 0 and inference["attention_mask"][1].tolist()[-1] == 1
    assert inference["encoder_attention_mask"][1].tolist()[-1] == 0


def test_truncation_cuts_the_target_end_then_the_prompt_start(processor):
    source, prompt_text, target_text = "Natalia hat 48 Clips an ihre Freunde verkauft.", "Response:", "Natalia sold clips"
    prompt = ids(processor.tokenizer, prompt_text)
    target = ids(processor.tokenizer, target_text) + [processor.tokenizer.eos_token_id]

    def truncated(max_length: int, max_source_length: int = 4) -> dict:
        short = LayAlignProcessor(
            tokenizer=processor.tokenizer,
            encoder_tokenizer=processor.encoder_tokenizer,
            max_length=max_length,
            max_source_length=max_source_length,
        )
        return short.encode_example(source, target_text, prompt_text)

    cut_target = truncated(len(prompt) + 3)
    assert cut_target["input_ids"] == prompt + target[:3]
    assert len(cut_target["encoder_input_ids"]) == 4
    cut_both = truncated(2)
    assert cut_both["input_ids"] == prompt[-1:] + target[:1]
    assert cut_both["labels"] == [-100] + target[:1]


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "encoder_tokenizer").is_dir()
    for loader in (LayAlignProcessor, AutoProcessor):
        reloaded = loader.from_pretrained(tmp_path)
        assert type(reloaded).__name__ == "LayAlignProcessor"
        assert reloaded.encoder_text_prefix == "query: " and reloaded.max_length == 64 and reloaded.max_source_length == 32
        batch, expected = reloaded(["Bata wa Janet"], targets=["Janet"]), processor(["Bata wa Janet"], targets=["Janet"])
        assert {key: value.tolist() for key, value in batch.items()} == {key: value.tolist() for key, value in expected.items()}


def test_a_checkpoint_without_tokenizer_files_takes_them_from_its_bases(processor, tiny_base_folders, tmp_path):
    # A small LayAlign-only checkpoint, as the shipped ones: config, weights and the processor's settings only.
    LayAlignForCausalLM.from_base_models(tiny_base_folders["encoder"], tiny_base_folders["llm"]).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path / "full_processor")
    (tmp_path / "processor_config.json").write_text((tmp_path / "full_processor" / "processor_config.json").read_text())
    expected = processor(["Bata wa Janet"], targets=["Janet"])
    for loader in (LayAlignProcessor, AutoProcessor):
        reloaded = loader.from_pretrained(tmp_path, trust_remote_code=True)
        assert type(reloaded).__name__ == "LayAlignProcessor"
        assert reloaded.encoder_text_prefix == "query: " and reloaded.max_length == 64 and reloaded.max_source_length == 32
        batch = reloaded(["Bata wa Janet"], targets=["Janet"])
        assert {key: value.tolist() for key, value in batch.items()} == {key: value.tolist() for key, value in expected.items()}
    assert LayAlignProcessor.from_pretrained(tmp_path, max_length=7).max_length == 7  # keyword arguments win
    # bases named here rather than by the config (moved folders), and a checkpoint that names none
    (tmp_path / "processor_config.json").unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    del config["encoder_name_or_path"], config["llm_name_or_path"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="holds no tokenizer files .* pass `encoder_name_or_path=` and `llm_name_or_path=`"):
        LayAlignProcessor.from_pretrained(tmp_path)
    named = LayAlignProcessor.from_pretrained(
        tmp_path, encoder_name_or_path=tiny_base_folders["encoder"], llm_name_or_path=tiny_base_folders["llm"]
    )
    assert named.encoder_text_prefix == "" and named.tokenizer("Janet")["input_ids"] == processor.tokenizer("Janet")["input_ids"]


def test_processor_output_drives_the_model(processor, tiny_base_folders):
    """The padded batches give what each example gives alone, built by hand from the two tokenizers: the loss (a
    mean over every target token) and the greedy continuation."""
    model = LayAlignForCausalLM.from_base_models(tiny_base_folders["encoder"], tiny_base_folders["llm"]).eval()
    sources, targets, prompts = ["Natalia hat 48 Clips.", "Bata"], ["Natalia sold 48 clips.", "Janet"], ["Q: Natalia", "Q"]
    eos = processor.tokenizer.eos_token_id

    def alone(source: str, text: list[int], **kwargs) -> dict:
        encoder_ids = processor.encoder_tokenizer("query: " + source)["input_ids"]
        return dict(encoder_input_ids=torch.tensor([encoder_ids]), input_ids=torch.tensor([text]), **kwargs)

    with torch.no_grad():
        loss = model(**processor(sources, targets=targets)).loss
        per_example = []
        for source, target in zip(sources, targets):
            target_ids = ids(processor.tokenizer, target) + [eos]
            per_example.append((model(**alone(source, target_ids, labels=torch.tensor([target_ids]))).loss, len(target_ids)))
    expected = sum(example_loss * count for example_loss, count in per_example) / sum(count for _, count in per_example)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

    batch = processor(sources, prompts=prompts)
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False, eos_token_id=None)[:, batch["input_ids"].shape[1] :]
    for row, (source, prompt) in zip(generated, zip(sources, prompts)):
        prompt_ids = ids(processor.tokenizer, prompt)
        single = model.generate(**alone(source, prompt_ids), max_new_tokens=3, do_sample=False, eos_token_id=None)
        assert row.tolist() == single[0, len(prompt_ids) :].tolist()


def test_bad_arguments_name_what_is_wrong(processor):
    with pytest.raises(ValueError, match="`targets` holds 1 texts but `sources` holds 2"):
        processor(["a", "b"], targets=["x"])
    with pytest.raises(ValueError, match="`prompt_template` must contain a `{query}` field"):
        LayAlignProcessor(tokenizer=processor.tokenizer, encoder_tokenizer=processor.encoder_tokenizer, prompt_template="Q:")
    with pytest.raises(ValueError, match="`max_length` must be a positive int"):
        LayAlignProcessor(tokenizer=processor.tokenizer, encoder_tokenizer=processor.encoder_tokenizer, max_length=0)
    with pytest.raises(ValueError, match="`padding_side` must be 'left' or 'right'"):
        processor(["a"], padding_side="middle")
