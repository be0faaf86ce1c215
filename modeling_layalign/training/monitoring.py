"""Watching the input mapping while it trains: has it collapsed into one soft prompt for every source?

A LayAlign stage-1 run can lower its loss without reading the source at all: the input mapping learns one constant
vector that primes "an English sentence of this kind" and the mapped tokens of every source converge to it (the
failure measured on the demo models, where the mean cosine between different sources' mapped tokens reached 1.000).
The training loss does not show this; the statistics here do.
"""

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Short questions in eight languages, unrelated to each other, so that a healthy mapping keeps them apart.
PROBE_SOURCES = (
    "Janet has 16 ducks and sells the eggs at the market every morning.",
    "Ein Zug fährt mit 80 Kilometern pro Stunde von Berlin nach Hamburg.",
    "小明有三个苹果，他又买了五个梨。",
    "Mama alinunua vitabu 12 kwa shilingi elfu mbili kila kimoja.",
    "図書館には本が四百冊あり、毎週二十冊が貸し出されます。",
    "В классе 25 учеников, и каждый принёс по две тетради.",
    "La piscina se llena con 300 litros de agua en una hora.",
    "Pierre court 5 kilomètres chaque samedi matin dans le parc.",
)


@torch.no_grad()
def mapping_statistics(model, processor, sources=PROBE_SOURCES) -> dict[str, float]:
    """How different the mapped encoder tokens of different sources are, and how large.

    Args:
        model: a `LayAlignForCausalLM` (or a peft model wrapping one).
        processor: the `LayAlignProcessor` whose encoder tokenizer reads `sources`.
        sources: at least two source texts, best in several languages and about unrelated things.

    Returns:
        `source_cosine`: mean cosine between the mean-pooled mapped tokens of every pair of different sources (the
        mapped tokens of a fresh mapping give about 0.85 on the demo models; 1.0 means one vector for every source);
        `norm_ratio`: mean norm of a mapped token over the mean norm of the LLM's input embeddings (a mapping whose
        tokens grow far beyond the embeddings has left the space the LLM reads); `gate_mean_abs` / `gate_max_abs`:
        the magnitude of the fused branches' gates (absent without layer fusion). Without input mapping only the
        gates are reported.

    Under FSDP or DeepSpeed ZeRO-3 every process must call it at once: the weights are gathered (see
    [`whole_weights`]).
    """
    if len(sources) < 2:
        raise ValueError(f"`sources` must hold at least two texts to compare, got {len(sources)}.")
    with whole_weights(model) as model:
        return _statistics(model, processor, sources)


def _statistics(model, processor, sources) -> dict[str, float]:
    statistics = {}
    if model.gates is not None:
        # The parameter, not the module's call: under ZeRO-3 a module that returns its own weight hands back an
        # empty tensor once its forward hooks have run. (Under peft, `weight` is the trained copy's.)
        gates = model.gates.weight.detach().float().abs()
        statistics["gate_mean_abs"] = gates.mean().item()
        statistics["gate_max_abs"] = gates.max().item()
    if model.input_mapping is None:
        return statistics
    was_training = model.training
    model.eval()
    try:
        batch = processor(list(sources), prompts=[""] * len(sources)).to(model.device)
        encoded = model.encode(batch["encoder_input_ids"], batch["encoder_attention_mask"])
    finally:
        model.train(was_training)
    mask = encoded.attention_mask.unsqueeze(-1).float()
    mapped = encoded.mapped_embeds.float()
    pooled = F.normalize((mapped * mask).sum(dim=1) / mask.sum(dim=1), dim=-1)
    cosines = pooled @ pooled.T
    count = len(sources)
    statistics["source_cosine"] = ((cosines.sum() - cosines.diagonal().sum()) / (count * count - count)).item()
    token_norm = (mapped.norm(dim=-1) * mask[..., 0]).sum() / mask.sum()
    embedding_norm = model.get_input_embeddings().weight.float().norm(dim=-1).mean()
    statistics["norm_ratio"] = (token_norm / embedding_norm).item()
    return statistics


@contextlib.contextmanager
def whole_weights(model) -> Iterator:
    """Yields the `LayAlignForCausalLM` inside `model` (a peft model, an FSDP 1 wrapper) with the weights that
    [`mapping_statistics`] reads whole on this process; every process of a sharded run must enter it together.

    Outside `forward`, a sharded model holds only this process's shard of a weight: DeepSpeed ZeRO-3 gathers a
    module's weights when the module is called, so the LayAlign modules and the input embeddings, read here directly,
    are gathered explicitly; FSDP 2 gathers a unit's weights in that unit's forward, so the root unit (the LayAlign
    modules, the encoder's embeddings) and the LLM's input embeddings are unsharded for the measurement, and each
    encoder block gathers its own when the encoder runs; FSDP 1 gathers every weight (`summon_full_params`).
    """
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            with whole_weights(model.module) as unwrapped:
                yield unwrapped
        return
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if any(hasattr(parameter, "ds_id") for parameter in model.parameters()):
        import deepspeed

        read = [model.get_input_embeddings().weight]
        for name in model.layalign_module_names:
            if (module := getattr(model, name)) is not None:
                read.extend(module.parameters())
        with deepspeed.zero.GatheredParameters(read):
            yield model
        return
    units = [module for module in (model, model.get_input_embeddings()) if isinstance(module, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


class MappingCollapseCallback(TrainerCallback):
    """Logs [`mapping_statistics`] at every logging step and warns once when the mapping has collapsed.

    The statistics join the Trainer's logs under `layalign/` (the progress printout and `trainer_state.json`'s
    `log_history`; report integrations listed before this callback log before it adds them).

    Args:
        processor: the `LayAlignProcessor` of the run; taken from the Trainer's `processing_class` when omitted.
        sources: the fixed probe set ([`PROBE_SOURCES`] by default, eight languages).
        collapse_cosine: the `source_cosine` at or above which the mapping counts as collapsed.
    """

    def __init__(self, processor=None, sources=PROBE_SOURCES, collapse_cosine: float = 0.95):
        self.processor = processor
        self.sources = tuple(sources)
        self.collapse_cosine = collapse_cosine
        self.warned = False
        self._pending: dict[str, float] = {}

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # DefaultFlowCallback, first in the list, has just decided whether this step logs. Every process measures:
        # under FSDP and ZeRO-3 the weights are gathered, which takes all of them.
        if control.should_log:
            processor = self.processor or kwargs.get("processing_class")
            self._pending = self.measure(kwargs["model"], processor, warn=state.is_world_process_zero)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not self._pending or logs is None or "loss" not in logs:
            return
        measured = {f"layalign/{name}": round(value, 4) for name, value in self._pending.items()}
        self._pending = {}
        logs.update(measured)
        if state.log_history:
            state.log_history[-1].update(measured)

    def measure(self, model, processor, warn: bool = True) -> dict[str, float]:
        """The statistics now, with the one-time warning (where `warn`) when the mapping has collapsed."""
        statistics = mapping_statistics(model, processor, self.sources)
        cosine = statistics.get("source_cosine")
        if warn and cosine is not None and cosine >= self.collapse_cosine and not self.warned:
            self.warned = True
            logger.warning(
                f"The input mapping has collapsed: the mapped tokens of different sources have mean cosine "
                f"{cosine:.3f} (>= {self.collapse_cosine}), norm {statistics['norm_ratio']:.1f}x the LLM's "
                "embeddings. The LLM now reads one soft prompt whatever the source. Lower the learning rate of the "
                "input mapping, add warm-up, or normalise the encoder states (`normalize_encoder_states=True`)."
            )
        return statistics
