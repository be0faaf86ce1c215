"""The trainable LayAlign modules: input mapping, boundary, layer-wise fusion and gates.

These are the only parameters LayAlign trains (33.57M for mT5-xl + a 7B Llama, as in the paper). Their state-dict
names (`input_mapping.up/down`, `boundary.embedding`, `fusion.layer_mix/projection/refine`, `gates.weight`)
are a public checkpoint format.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput


class LayAlignInputMapping(nn.Module):
    """Maps the encoder's states (its final output, or `mapped_encoder_layer`) into the LLM's embedding space
    (MindMerger's input alignment).

    `Linear(d_enc, 2 d_enc) -> ReLU -> Linear(2 d_enc, d_llm)` (paper Sec. 3.1; reference code: `MLP` in
    `LayAlign.py`, there `mapping.mlp.linear1` / `linear2`).
    """

    def __init__(self, encoder_hidden_size: int, llm_hidden_size: int):
        super().__init__()
        self.up = nn.Linear(encoder_hidden_size, 2 * encoder_hidden_size)
        self.down = nn.Linear(2 * encoder_hidden_size, llm_hidden_size)

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        """`(batch, encoder_len, d_enc)` -> `(batch, encoder_len, d_llm)`."""
        return self.down(F.relu(self.up(encoder_states)))


class LayAlignBoundary(nn.Module):
    """The learned vector that separates the mapped encoder tokens from the text; starts at zero.

    Reference code: `Mapping.end_boundary` in `LayAlign.py`, a `(1, 1, d_llm)` zero-initialised parameter.
    """

    def __init__(self, llm_hidden_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(llm_hidden_size))

    def forward(self, batch_size: int) -> torch.Tensor:
        """Returns `(batch, 1, d_llm)`."""
        return self.embedding.expand(batch_size, 1, -1)


class LayAlignLayerFusion(nn.Module):
    """Mixes the encoder's layers into one key source and one value source per adapted LLM layer.

    A linear map over the layer axis, `Linear(N_enc, 2M)`, gives each of the `2M` sources its own learned mix of all
    encoder layers; after a ReLU a shared `Linear(d_enc, d_llm)` brings them to the LLM's width ("mlp" adds a ReLU
    and `Linear(d_llm, d_llm)`). Source `2m` feeds the keys of adapted layer `m`, source `2m + 1` its values.

    Paper Sec. 3.2 ("layer-wise adaptive fusion"); reference code: `WeightedLinearProjector` in
    `layer_wise_aligner.py` (`fc1` over the layer axis, `fc2`, and `fc3` for the "MLP" structure).
    """

    def __init__(
        self, num_encoder_layers: int, num_adapted_layers: int, encoder_hidden_size: int, llm_hidden_size: int, structure: str
    ):
        super().__init__()
        self.layer_mix = nn.Linear(num_encoder_layers, 2 * num_adapted_layers)
        self.projection = nn.Linear(encoder_hidden_size, llm_hidden_size)
        self.refine = nn.Linear(llm_hidden_size, llm_hidden_size) if structure == "mlp" else None

    def forward(self, encoder_layers: torch.Tensor) -> torch.Tensor:
        """`(batch, encoder_len, d_enc, N_enc)` -> `(batch, encoder_len, 2M, d_llm)`.

        The layer axis comes last so that `layer_mix` applies to it without a copy of the stacked states.
        """
        mixed = F.relu(self.layer_mix(encoder_layers)).transpose(2, 3)
        fused = self.projection(mixed)
        if self.refine is not None:
            fused = self.refine(F.relu(fused))
        return fused


class LayAlignGates(nn.Module):
    """The learned scales of the fused branches, one per adapted LLM layer, in `weight`; exactly zero at init.

    Reference code: `AdaptedAttention.adaption_gate` in `peft/src/peft/tuners/layalign_prompt/layer.py`, one `(1,)`
    parameter in each adapted layer. One vector here, in the order of `adapted_llm_layers`: autograd stores the
    gradient of every parameter with an operator of its own, 32 per training step over a 7B Llama
    (`benchmarks/bench_ops.py`). Checkpoints written with one parameter per layer (`gates.layers.<i>.gate`, before
    2026-12-05) load through [`stack_per_layer_gates`].
    """

    def __init__(self, adapted_layers: list[int]):
        super().__init__()
        self.adapted_layers = list(adapted_layers)
        self.weight = nn.Parameter(torch.zeros(len(self.adapted_layers)))
        self.register_load_state_dict_pre_hook(stack_per_layer_gates)

    def forward(self, per_source: bool = False) -> torch.Tensor:
        """`(num_adapted_layers,)`, in the order of `adapted_llm_layers`; with `per_source`, `(2 * num_adapted_layers,
        1)`: 1 for each adapted layer's key source and its gate for its value source, in the order of the fusion's
        sources (`2m`, `2m + 1`), so that one product scales every value source.

        Every read of the gates goes through this call: it works the same when peft wraps this module, and under
        DeepSpeed ZeRO-3 a weight read outside its own module's forward is registered with the calling module
        instead, whose parameter trace a resumed run then no longer matched ("tracing error ... gates.weight").
        """
        if not per_source:
            return self.weight
        return torch.stack([torch.ones_like(self.weight), self.weight], dim=1).view(-1, 1)


PER_LAYER_GATE = "layers.{layer}.gate"


def stack_per_layer_gates(module: LayAlignGates, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: the gates of a checkpoint that holds one `(1,)` tensor per adapted layer
    (`<prefix>layers.<i>.gate`) become the `(num_adapted_layers,)` vector `<prefix>weight`, in place."""
    keys = [prefix + PER_LAYER_GATE.format(layer=layer) for layer in module.adapted_layers]
    if prefix + "weight" not in state_dict and all(key in state_dict for key in keys):
        if misshaped := [f"`{key}` {tuple(state_dict[key].shape)}" for key in keys if state_dict[key].numel() != 1]:
            raise ValueError(f"Per-layer gates hold one value each; the checkpoint's {', '.join(misshaped)} do not.")
        state_dict[prefix + "weight"] = torch.cat([state_dict.pop(key).reshape(-1) for key in keys])


@dataclass
class LayAlignEncoderOutput(ModelOutput):
    """What [`LayAlignForCausalLM.encode`] computes once per batch of source texts.

    Attributes:
        mapped_embeds: `(batch, encoder_len, d_llm)`, the mapped encoder states in the LLM's embedding space, or
            `None` without input mapping.
        fused_states: `(batch, encoder_len, 2 * num_adapted_layers, d_llm)`, the fusion's output: source `2m` feeds
            the keys of adapted layer `m`, source `2m + 1` its values (each layer projects them with its own frozen
            `k_proj` / `v_proj`), or `None` without layer fusion.
        attention_mask: `(batch, encoder_len)`, 1 on real encoder tokens.
    """

    mapped_embeds: torch.Tensor | None = None
    fused_states: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

