"""LayAlign for transformers: `LayAlignConfig`, `LayAlignForCausalLM` and `LayAlignProcessor`, registered with the
auto classes.

The files at this level are the model: exactly what `save_pretrained` copies next to a checkpoint as remote code
(they import each other relatively, never the subpackages). The tools around the model live in subpackages that
import it: `training`, `evaluation`, `conversion`.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from .configuration_layalign import LayAlignConfig
from .modeling_layalign import LayAlignEncoderOutput, LayAlignForCausalLM, LayAlignPreTrainedModel
from .processing_layalign import LayAlignProcessor


AutoConfig.register(LayAlignConfig.model_type, LayAlignConfig, exist_ok=True)
AutoModel.register(LayAlignConfig, LayAlignForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(LayAlignConfig, LayAlignForCausalLM, exist_ok=True)
AutoProcessor.register(LayAlignConfig, LayAlignProcessor, exist_ok=True)

# The tools' modules before they moved into role subpackages (2026-12-06). The old paths import the new modules, with
# a FutureWarning, for one release (`modeling_layalign.evaluation`, now a subpackage, forwards its old names itself).
MOVED_MODULES = {
    f"{__name__}.{old}": f"{__name__}.{new}"
    for old, new in {
        "data": "training.data",
        "monitoring": "training.monitoring",
        "warm_start": "training.warm_start",
        "engine_checkpoints": "training.engine_checkpoints",
        "distributed_exit": "training.distributed_exit",
        "ladder": "evaluation.ladder",
        "paper_benchmarks": "evaluation.paper_benchmarks",
        "accuracy_metric": "evaluation.accuracy_metric",
        "cli_arguments": "evaluation.cli_arguments",
        "convert": "conversion.convert",
        "reference_checkpoint": "conversion.reference_checkpoint",
    }.items()
}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path of `MOVED_MODULES` and loads it as the module it moved to; `python -m` on an old path
    runs the new one."""

    def find_spec(self, fullname: str, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name]
        warnings.warn(
            f"`{spec.name}` moved to `{new}`; the old path goes away in the next release.", FutureWarning, stacklevel=2
        )
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass

    def get_code(self, fullname: str):
        new = MOVED_MODULES[fullname]
        return compile(
            f"import runpy, warnings\nwarnings.warn({f'`{fullname}` moved to `{new}`: run `python -m {new}`.'!r}, "
            f"FutureWarning)\nrunpy.run_module({new!r}, run_name='__main__', alter_sys=True)",
            fullname,
            "exec",
        )


if not any(isinstance(finder, _MovedModule) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModule())

__all__ = [
    "LayAlignConfig",
    "LayAlignEncoderOutput",
    "LayAlignForCausalLM",
    "LayAlignPreTrainedModel",
    "LayAlignProcessor",
]
