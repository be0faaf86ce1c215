"""Measuring a LayAlign model: scoring, losses and batched generation (`scoring`), the answer ladder (`ladder`), the
paper's benchmarks (`paper_benchmarks`), the `evaluate` metric base (`accuracy_metric`) and the count checks of the
command lines (`cli_arguments`). Imports the model; the model never imports this.

Until 2026-12-06 `modeling_layalign.evaluation` was the module now named `modeling_layalign.evaluation.scoring`; its
names still import from here, with a `FutureWarning`, for one release.
"""

import importlib
import warnings


_SCORING_NAMES = (
    "alignment_scores", "extract_last_number", "is_correct_choice", "is_correct_label", "is_correct_number",
    "layalign_generate", "layalign_target_loss", "llm_generate", "llm_target_loss", "load_metric", "number_recall",
)  # fmt: skip


def __getattr__(name: str):
    if name not in _SCORING_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"`modeling_layalign.evaluation.{name}` moved to `modeling_layalign.evaluation.scoring.{name}`; the old "
        "path goes away in the next release.",
        FutureWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(".scoring", __name__), name)
