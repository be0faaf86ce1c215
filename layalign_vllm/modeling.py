"""LayAlign (Ruan et al., NAACL 2025, arXiv 2502.11405) in vLLM: vLLM's LLM plus a per-request multilingual encoder.

vLLM serves the model as an encoder-decoder one, as it serves Whisper (see `processing.py` for the request layout):

- `embed_multimodal` runs the frozen encoder once per request and computes what the LLM reads from it: the mapped
  final states (input alignment, paper Sec. 3.1) and the `2M` fused sources of the `M` adapted layers (layer-wise
  fusion, Sec. 3.2), as `modeling_layalign.LayAlignForCausalLM.encode` does;
- on a request's first step, `forward` writes the mapped states and the boundary over the placeholders of its
  prefix `[BOS, mapped encoder tokens, boundary]`, and every adapted layer projects its two sources with its own
  frozen key and value maps into its fused keys and values, which a vLLM `CrossAttention` writes into the request's
  cross-attention KV cache; later steps read them from there. So the encoder runs, and the fused K/V are projected,
  once per request;
- in every adapted layer the layer's own normed and rotated queries attend over the fused keys and values (no
  rotary embedding on them) through a separate softmax, and the result is added to the self-attention output before
  `o_proj` (`modeling_layalign/attention_layalign.py`, `layalign_attention_forward`).

The gate scales the projected fused values, once per request (`attention_layalign.project_fused_kv`): the paper's
`gate * softmax(q K^T) V` with the product moved onto `V`, exact whether or not the family's value map has a bias.
The LayAlign modules keep our state-dict names (`modeling_layalign/modules_layalign.py`), so the checkpoints that
`LayAlignForCausalLM.save_pretrained(..., checkpoint_format="full")` writes load as they are.

Tested against `generate` (tests/serving/test_vllm.py) on CPU, eager mode, float32. Assumptions and limits:
`forward` matches `encoder_outputs` to the starting requests (tokens of position 0) in batch order, which holds for
vLLM's V1 runner on CPU (no prefill reordering, no chunked prefill for encoder-decoder models) and is checked by
count; the encoder runs one request at a time (no padded batch). A LayAlign-only checkpoint's bases are read from
the folders its config names (or `hf_overrides`) after its own weights, and checked against it (`bases.py`).
"""

import copy
from collections.abc import Iterable, Mapping
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import CrossAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.v1.attention.backend import AttentionType

from .bases import LAYALIGN_ONLY, llm_weights, load_encoder_weights
from .configuration import LayAlignVllmConfig, check_servable
from .families import ENCODER_FAMILIES, LLM_FAMILIES
from .processing import LayAlignDummyInputsBuilder, LayAlignMultiModalProcessor, LayAlignProcessingInfo


logger = init_logger(__name__)

# Checkpoints saved before 2026-12-05 hold one gate per adapted layer (`modules_layalign.PER_LAYER_GATE`).
PER_LAYER_GATE = "gates.layers.{layer}.gate"


# -- the fused branch inside vLLM's attention ------------------------------------------------------------------------


def project_fused_kv(
    attention: nn.Module, key_source: torch.Tensor, value_source: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapted layer's fused keys and values, projected by its own frozen key and value maps.

    vLLM merges `q_proj`, `k_proj` and `v_proj` into `qkv_proj`; its output is sliced rather than its weight, since
    on CPU vLLM replaces that weight by a packed one after loading.

    Args:
        attention: the layer's vLLM attention (`qkv_proj`, `q_size`, `kv_size`).
        key_source, value_source: `(encoder_tokens, d_llm)`, the sources of this layer's keys and values of every
            request that starts in this step, in the LLM's dtype.
        gate: `()`, this layer's gate.

    Returns:
        `(keys, values)`, each `(encoder_tokens, num_kv_heads * head_dim)`, the values multiplied by the gate (after
        the bias, as `attention_layalign.project_fused_kv` does for a `v_proj` with bias).
    """
    num_tokens = key_source.shape[0]
    projected, _ = attention.qkv_proj(torch.cat([key_source, value_source]))
    keys = projected[:num_tokens, attention.q_size : attention.q_size + attention.kv_size]
    values = projected[num_tokens:, attention.q_size + attention.kv_size :] * gate.to(projected.dtype)
    return keys, values


class FusedAttention(nn.Module):
    """The fused branch of one adapted layer: a vLLM cross-attention over the layer's fused keys and values.

    vLLM keeps the keys and values of `CrossAttention` in the request's cross-attention KV cache, written on the
    request's first step (when they are passed) and read on every later step (when `None` is passed). The branch
    reads every source token: a model-wide sliding window (Mistral's), which vLLM's attention takes from
    `cache_config`, is the self-attention's only.
    """

    def __init__(self, attention: nn.Module, slot: int, cache_config, prefix: str):
        super().__init__()
        self.slot = slot
        if cache_config is not None and cache_config.sliding_window is not None:
            cache_config = copy.copy(cache_config)
            cache_config.sliding_window = None
        self.attn = CrossAttention(
            attention.num_heads,
            attention.head_dim,
            attention.scaling,
            num_kv_heads=attention.num_kv_heads,
            cache_config=cache_config,
            prefix=f"{prefix}.attn",
            attn_type=AttentionType.ENCODER_DECODER,
        )

    def forward(
        self,
        attention: nn.Module,
        query: torch.Tensor,
        fused_sources: tuple[torch.Tensor, ...] | None,
        fused_gates: torch.Tensor | None,
    ) -> torch.Tensor:
        """`(num_tokens, num_heads * head_dim)` for the normed and rotated `query` of the same shape.

        `fused_sources` (the `2M` sources, each `(encoder_tokens, d_llm)`) and `fused_gates` (`(M,)`) are given on a
        step where some request starts, `None` otherwise."""
        keys = values = None
        if fused_sources is not None:
            keys, values = project_fused_kv(
                attention, fused_sources[2 * self.slot], fused_sources[2 * self.slot + 1], fused_gates[self.slot]
            )
            keys = attention.norm_keys(keys)
        return self.attn(query, keys, values)


class LayAlignLlamaAttention(LlamaAttention):
    """vLLM's Llama attention; in adapted layers, plus the fused branch before `o_proj`."""

    def __init__(self, *args, slots: Mapping[int, int], **kwargs):
        super().__init__(*args, **kwargs)
        slot = slots.get(extract_layer_index(kwargs["prefix"]))
        self.fused = None
        if slot is not None:
            self.fused = FusedAttention(self, slot, kwargs.get("cache_config"), prefix=f"{kwargs['prefix']}.fused")

    def norm_queries_and_keys(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the family does to the projected queries and keys before RoPE: nothing in Llama."""
        return q, k

    def norm_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """What the family does to projected keys before RoPE, applied to the fused keys (which get no RoPE)."""
        return keys

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        fused_sources: tuple[torch.Tensor, ...] | None = None,
        fused_gates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, *self.norm_queries_and_keys(q, k))
        attn_output = self.attn(q, k, v)
        if self.fused is not None:
            attn_output = attn_output + self.fused(self, q, fused_sources, fused_gates)
        output, _ = self.o_proj(attn_output)
        return output


class LayAlignQwen3Attention(LayAlignLlamaAttention):
    """Qwen3's attention on vLLM's Llama one: an RMSNorm over each head of the queries and of the keys before RoPE
    (`q_norm`, `k_norm`, loaded by these names, as vLLM's `Qwen3Attention` has them). The fused keys go through
    `k_norm` too (`attention_layalign.LLM_FAMILIES["qwen3"]`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        epsilon = kwargs["config"].rms_norm_eps
        self.q_norm = RMSNorm(self.head_dim, eps=epsilon)
        self.k_norm = RMSNorm(self.head_dim, eps=epsilon)

    def norm_queries_and_keys(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _per_head(self.q_norm, q, self.head_dim), self.norm_keys(k)

    def norm_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return _per_head(self.k_norm, keys, self.head_dim)


def _per_head(norm: nn.Module, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`norm` over each head of `x`, `(num_tokens, num_heads * head_dim)`."""
    return norm(x.view(*x.shape[:-1], -1, head_dim)).view(x.shape)


class LayAlignLlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer with our `attention` (a [`LayAlignLlamaAttention`]); passes the fused sources
    to it."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        prefix: str = "",
        config=None,
        *,
        attention: type[LayAlignLlamaAttention],
        slots: Mapping[int, int],
    ):
        super().__init__(vllm_config, prefix, config, attn_layer_type=partial(attention, slots=slots))

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        fused_sources: tuple[torch.Tensor, ...] | None = None,
        fused_gates: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, fused_sources, fused_gates)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


# -- the LayAlign modules, with the state-dict names of modeling_layalign/modules_layalign.py ---------------------


class LayAlignInputMapping(nn.Module):
    """`Linear(d_enc, 2 d_enc) -> ReLU -> Linear(2 d_enc, d_llm)` (`modules_layalign.LayAlignInputMapping`)."""

    def __init__(self, encoder_hidden_size: int, llm_hidden_size: int):
        super().__init__()
        self.up = nn.Linear(encoder_hidden_size, 2 * encoder_hidden_size)
        self.down = nn.Linear(2 * encoder_hidden_size, llm_hidden_size)

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        """`(encoder_len, d_enc)` -> `(encoder_len, d_llm)`."""
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
        """`(encoder_len, d_enc, N_enc)` -> `(encoder_len, 2M, d_llm)`."""
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
        self.llm = resolve_obj_by_qualname(family.causal_lm.replace(":", "."))(
            vllm_config=vllm_config.with_hf_config(text_config, architectures=[family.architecture]),
            prefix=maybe_prefix(prefix, "llm"),
            layer_type=partial(
                LayAlignLlamaDecoderLayer,
                attention=resolve_obj_by_qualname(family.attention.replace(":", ".")),
                slots=slots,
            ),
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
        """Encodes each request's source; `modeling_layalign.LayAlignForCausalLM.encode` for one unpadded source.

        Args:
            source_ids: one `(encoder_len,)` tensor of encoder token ids per request.

        Returns:
            one `(encoder_len, d_llm * (use_input_mapping + 2M))` tensor per request: the mapped final states, then
            the fusion's `2M` sources flattened (source `2m` feeds the keys of adapted layer `m`, `2m + 1` its values).
        """
        outputs = []
        for ids in source_ids:
            ids = ids.reshape(1, -1).long()
            encoded = self.encoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            parts = []
            if self.input_mapping is not None:
                parts.append(self.input_mapping(encoded.last_hidden_state[0]))
            if self.fusion is not None:
                hidden_states = encoded.hidden_states
                layers = torch.stack([hidden_states[index][0] for index in self.config.fused_encoder_layers], -1)
                parts.append(self.fusion(layers).flatten(1))
            outputs.append(torch.cat(parts, dim=-1))
        return outputs

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
