"""LayAlign (Ruan et al., NAACL 2025, arXiv 2502.11405) in vLLM: vLLM's LLM plus a per-request multilingual encoder.

vLLM serves the model as an encoder-decoder one, as it serves Whisper (see `processing.py` for the request layout):

- `embed_multimodal` runs the frozen encoder once per request and computes what the LLM reads from it: the mapped
  states (input alignment, paper Sec. 3.1) and the `2M` fused sources of the `M` adapted layers (layer-wise
  fusion, Sec. 3.2), as `modeling_layalign.LayAlignForCausalLM.encode` does;
- on a request's first step, `forward` writes the mapped states and the boundary over the placeholders of its
  prefix `[BOS, mapped encoder tokens, boundary]`, and every adapted layer projects its two sources with its own
  frozen key and value maps into its fused keys and values, which a vLLM `CrossAttention` writes into the request's
  cross-attention KV cache; later steps read them from there. So the encoder runs, and the fused K/V are projected,
  once per request;
- in every adapted layer the fused branch (`attention.py`) attends from the layer's own queries over those keys and
  values, and adds the result to the self-attention output before `o_proj`.

The LLM is vLLM's causal LM of its family with our decoder layers (`families.LLM_FAMILIES`: vLLM's Llama classes for
Llama, Mistral, Qwen2 and Qwen3; our own assembly of vLLM's Gemma parts for Gemma 2 and 3, `gemma.py`).
The LayAlign modules keep our state-dict names (`modeling_layalign/modules_layalign.py`), so the checkpoints that
`LayAlignForCausalLM.save_pretrained(..., checkpoint_format="full")` writes load as they are.

Tested against `generate` (tests/serving/test_vllm.py) on CPU, float32, eager and compiled. Assumptions and
limits: `forward` matches `encoder_outputs` to the starting requests (tokens of position 0) in batch order, which
holds for vLLM's V1 runner on CPU (no prefill reordering, no chunked prefill for encoder-decoder models) and is
checked by count. A LayAlign-only checkpoint's bases are read from the folders its config names (or
`hf_overrides`) after its own weights, and checked against it (`bases.py`).
"""

import copy
from collections.abc import Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.utils import maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from .bases import LAYALIGN_ONLY, llm_weights, load_encoder_weights
from .configuration import LayAlignVllmConfig, check_servable
from .families import ENCODER_FAMILIES, LLM_FAMILIES, resolve
from .processing import LayAlignDummyInputsBuilder, LayAlignMultiModalProcessor, LayAlignProcessingInfo


logger = init_logger(__name__)

# Checkpoints saved before 2026-12-05 hold one gate per adapted layer (`modules_layalign.PER_LAYER_GATE`).
PER_LAYER_GATE = "gates.layers.{layer}.gate"


# -- the LayAlign modules, with the state-dict names of modeling_layalign/modules_layalign.py ---------------------


class LayAlignInputMapping(nn.Module):
    """`Linear(d_enc, 2 d_enc) -> ReLU -> Linear(2 d_enc, d_llm)` (`modules_layalign.LayAlignInputMapping`)."""

    def __init__(self, encoder_hidden_size: int, llm_hidden_size: int):
        super().__init__()
        self.up = nn.Linear(encoder_hidden_size, 2 * encoder_hidden_size)
        self.down = nn.Linear(2 * encoder_hidden_size, llm_hidden_size)

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        """`(batch, encoder_len, d_enc)` -> `(batch, encoder_len, d_llm)`."""
        return self.down(F.relu(self.up(encoder_states)))


class LayAlignBoundary(nn.Module):
    """The learned vector between the mapped encoder tokens and the text (`modules_layalign.LayAlignBoundary`)."""

    def __init__(self, llm_hidden_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(llm_hidden_size))


class LayAlignLayerFusion(nn.Module):
    """Mixes the encoder's layers into the `2M` sources of the adapted layers' keys and values
    (`modules_layalign.LayAlignLayerFusion`)."""

    def __init__(
        self,
        num_encoder_layers: int,
        num_adapted_layers: int,
        encoder_hidden_size: int,
        llm_hidden_size: int,
        structure: str,
    ):
        super().__init__()
        self.layer_mix = nn.Linear(num_encoder_layers, 2 * num_adapted_layers)
        self.projection = nn.Linear(encoder_hidden_size, llm_hidden_size)
        self.refine = nn.Linear(llm_hidden_size, llm_hidden_size) if structure == "mlp" else None

    def forward(self, encoder_layers: torch.Tensor) -> torch.Tensor:
        """`(batch, encoder_len, d_enc, N_enc)` -> `(batch, encoder_len, 2M, d_llm)`."""
        fused = self.projection(F.relu(self.layer_mix(encoder_layers)).transpose(-1, -2))
        return fused if self.refine is None else self.refine(F.relu(fused))


class LayAlignGates(nn.Module):
    """One gate per adapted layer, in the order of `adapted_llm_layers` (`modules_layalign.LayAlignGates`)."""

    def __init__(self, num_adapted_layers: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_adapted_layers))


# -- the model ------------------------------------------------------------------------------------------------------


@MULTIMODAL_REGISTRY.register_processor(
    LayAlignMultiModalProcessor, info=LayAlignProcessingInfo, dummy_inputs=LayAlignDummyInputsBuilder
)
class LayAlignForConditionalGeneration(nn.Module, SupportsMultiModal):
    """A LayAlign checkpoint (`architectures: ["LayAlignForCausalLM"]`) in vLLM.

    Children, named as in `LayAlignForCausalLM`: `encoder` (the transformers module, frozen, eval mode), `llm` (vLLM's
    causal LM of the family, with our decoder layers), `input_mapping` and `boundary` (unless
    `use_input_mapping=False`), `fusion` and `gates` (unless `use_layer_fusion=False`, MindMerger mode).
    """

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return None  # the source never appears in the prompt text

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: LayAlignVllmConfig = vllm_config.model_config.hf_config
        check_servable(config)
        self.config = config
        text_config, encoder_config = config.text_config, config.encoder_config
        self.llm_hidden_size = text_config.hidden_size
        self.num_adapted_layers = config.num_adapted_layers

        self.encoder = ENCODER_FAMILIES[encoder_config.model_type].build(encoder_config)
        self.input_mapping = self.boundary = self.fusion = self.gates = None
        if config.use_input_mapping:
            self.input_mapping = LayAlignInputMapping(encoder_config.hidden_size, self.llm_hidden_size)
            self.boundary = LayAlignBoundary(self.llm_hidden_size)
        if self.num_adapted_layers:
            self.fusion = LayAlignLayerFusion(
                len(config.fused_encoder_layers),
                self.num_adapted_layers,
                encoder_config.hidden_size,
                self.llm_hidden_size,
                config.fusion_structure,
            )
            self.gates = LayAlignGates(self.num_adapted_layers)

        family = LLM_FAMILIES[text_config.model_type]
        if family.text_config_overrides:
            text_config = copy.deepcopy(text_config)
            for name, value in family.text_config_overrides.items():
                setattr(text_config, name, value)
        slots = {layer: slot for slot, layer in enumerate(config.adapted_llm_layers)} if self.num_adapted_layers else {}
        self.llm = resolve(family.causal_lm)(
            vllm_config=vllm_config.with_hf_config(text_config, architectures=[family.architecture]),
            prefix=maybe_prefix(prefix, "llm"),
            layer_type=partial(resolve(family.decoder_layer), attention=resolve(family.attention), slots=slots),
        )
        logger.info(
            "LayAlign: %s encoder, %s LLM, input mapping %s, fused attention in LLM layers %s.",
            encoder_config.model_type,
            text_config.model_type,
            "on" if config.use_input_mapping else "off",
            sorted(slots) or "none (MindMerger mode)",
        )

    def get_language_model(self) -> nn.Module:
        return self.llm

    # -- encoder side: once per request ---------------------------------------------------------------------------

    @torch.inference_mode()
    def embed_multimodal(self, source_ids: list[torch.Tensor], **kwargs) -> list[torch.Tensor]:
        """Encodes the sources of the requests that start in this step; `modeling_layalign.LayAlignForCausalLM.encode`.

        The sources run as one batch, right-padded and masked: every encoder family of ours reads its real tokens
        unchanged by padding on the right (masked keys; positions that start at each source's first token, or that
        skip the pad id, NLLB's and XLM-R's; causal attention in decoder-only encoders).

        Args:
            source_ids: one `(encoder_len,)` tensor of encoder token ids per request.

        Returns:
            one `(encoder_len, d_llm * (use_input_mapping + 2M))` tensor per request: the mapped states, then
            the fusion's `2M` sources flattened (source `2m` feeds the keys of adapted layer `m`, `2m + 1` its values).
        """
        lengths = [ids.numel() for ids in source_ids]
        pad_id = self.config.encoder_config.pad_token_id
        batch = pad_sequence(
            [ids.reshape(-1).long() for ids in source_ids], batch_first=True, padding_value=pad_id or 0
        )
        mask = (torch.arange(batch.shape[1], device=batch.device) < torch.tensor(lengths, device=batch.device)[:, None])
        encoded = self.encoder(input_ids=batch, attention_mask=mask.long(), output_hidden_states=True)
        parts = []
        if self.input_mapping is not None:
            # `None`: the final output, as `modeling_layalign.encoders_layalign.mapped_encoder_states` reads it.
            layer = self.config.mapped_encoder_layer
            parts.append(self.input_mapping(encoded.last_hidden_state if layer is None else encoded.hidden_states[layer]))
        if self.fusion is not None:
            layers = torch.stack([encoded.hidden_states[index] for index in self.config.fused_encoder_layers], -1)
            parts.append(self.fusion(layers).flatten(2))
        rows = torch.cat(parts, dim=-1)
        return [request_rows[:length] for request_rows, length in zip(rows, lengths)]

    def embed_input_ids(
        self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal=None
    ) -> torch.Tensor:
        return self.llm.embed_input_ids(input_ids)

    # -- LLM side ---------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_outputs: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """One step over the flattened tokens of every scheduled request.

        Args:
            input_ids, positions: `(num_tokens,)`.
            encoder_outputs: the [`embed_multimodal`] outputs of the requests that start in this step, in batch order
                (vLLM schedules a request's encoder input only on its first step, with its whole prompt, since it
                turns chunked prefill off for encoder-decoder models).

        Returns:
            `(num_tokens, d_llm)` hidden states.
        """
        if inputs_embeds is None:
            inputs_embeds = self.llm.embed_input_ids(input_ids)
        fused_sources = fused_gates = None
        if encoder_outputs:
            if self.input_mapping is not None:
                inputs_embeds = self._write_prefixes(inputs_embeds, positions, encoder_outputs)
            if self.fusion is not None:
                width = 2 * self.num_adapted_layers * self.llm_hidden_size
                sources = torch.cat([output[:, -width:] for output in encoder_outputs]).to(inputs_embeds.dtype)
                fused_sources = sources.view(sources.shape[0], 2 * self.num_adapted_layers, -1).unbind(1)
                fused_gates = self.gates.weight
        return self.llm.model(
            None, positions, intermediate_tensors, inputs_embeds, fused_sources=fused_sources, fused_gates=fused_gates
        )

    def _write_prefixes(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, encoder_outputs: list[torch.Tensor]
    ) -> torch.Tensor:
        """Writes `[mapped encoder tokens, boundary]` over the placeholders after each starting request's BOS.

        A starting request is found at its token of position 0, and they come in the order of `encoder_outputs`
        (both follow vLLM's batch order).
        """
        starts = (positions == 0).nonzero().flatten().tolist()
        if len(starts) != len(encoder_outputs):
            raise RuntimeError(
                f"LayAlign: {len(encoder_outputs)} requests start in this step but {len(starts)} tokens have "
                "position 0; "
                "each request's prompt must be scheduled whole on its first step (chunked prefill off)."
            )
        first = int(self.config.text_config.bos_token_id is not None)
        inputs_embeds = inputs_embeds.clone()
        for start, output in zip(starts, encoder_outputs):
            rows = torch.cat([output[:, : self.llm_hidden_size], self.boundary.embedding[None]]).to(inputs_embeds.dtype)
            inputs_embeds[start + first : start + first + rows.shape[0]] = rows
        return inputs_embeds

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.llm.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads a checkpoint: `llm.*` through vLLM's loader of the family (which merges q/k/v and gate/up), the
        encoder and the LayAlign modules by name. Per-layer gates of older checkpoints are stacked. A LayAlign-only
        checkpoint holds the LayAlign modules only: the encoder and the LLM are then read from the bases its config
        names, each checked against the checkpoint's fingerprint of it (`bases.py`)."""
        parameters = dict(self.named_parameters())
        llm_weights_of_checkpoint, per_layer_gates, loaded = [], {}, set()
        for name, tensor in weights:
            if name.startswith("llm."):
                llm_weights_of_checkpoint.append((name.removeprefix("llm."), tensor))
            elif name in parameters:
                parameters[name].data.copy_(tensor)
                loaded.add(name)
            elif name.startswith("gates.layers."):
                per_layer_gates[name] = tensor
            elif not name.startswith("encoder.pooler."):
                raise ValueError(f"The LayAlign checkpoint holds a weight this model does not have: {name!r}.")
        if per_layer_gates and self.gates is not None:
            names = [PER_LAYER_GATE.format(layer=layer) for layer in self.config.adapted_llm_layers]
            self.gates.weight.data.copy_(torch.cat([per_layer_gates[name].reshape(-1) for name in names]))
            loaded.add("gates.weight")
        llm_source = llm_weights_of_checkpoint
        if self.config.checkpoint_format == LAYALIGN_ONLY:
            dtype = next(self.encoder.parameters()).dtype  # the model's: built under vLLM's default dtype
            self.encoder.load_state_dict(load_encoder_weights(self.config, dtype))
            loaded |= {f"encoder.{name}" for name, _ in self.encoder.named_parameters()}
            llm_source = llm_weights(self.config)
            logger.info(
                "LayAlign: bases read from %s (encoder) and %s (LLM).",
                self.config.encoder_name_or_path,
                self.config.llm_name_or_path,
            )
        loaded |= {f"llm.{name}" for name in self.llm.load_weights(llm_source)}
        self.encoder.eval()
        return loaded
