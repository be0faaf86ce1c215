"""LayAlign (Ruan et al., NAACL 2025, arXiv 2502.11405): every layer of a frozen multilingual encoder fused into a
frozen LLM.

The LLM reads `[BOS, mapped encoder tokens, boundary, text]` (input alignment, `modules_layalign.py` and
`sequence_layalign.py`), and in every adapted layer its own queries also attend, through a separate softmax scaled by
a zero-initialised gate, over keys and values that its own frozen `k_proj` / `v_proj` project from a learned
per-layer mix of all encoder layers (layer-wise fusion, `attention_layalign.py`). Checkpoint I/O lives in
`checkpoint_layalign.py`, `generate` in `generation_layalign.py`. The reference code is `LayAlign.py` in the authors'
repository; where this file differs on purpose, the docstring says so.
"""

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .attention_layalign import fused_attention_implementation, fused_attention_inputs, llm_family
from .cache_layalign import cache_for_pass
from .checkpoint_layalign import LayAlignCheckpointMixin
from .configuration_layalign import LayAlignConfig
from .generation_layalign import LayAlignGenerationMixin
from .encoders_layalign import encoder_family, mapped_encoder_states
from .inputs_layalign import (
    all_ones_encoder_mask,
    check_encoder_inputs,
    check_labels,
    check_token_ids,
    check_token_range,
)
from .legacy_layalign import GATES_KEY_PATTERN, PER_LAYER_GATES_PATTERN
from .modules_layalign import (
    LayAlignBoundary,
    LayAlignEncoderOutput,
    LayAlignGates,
    LayAlignInputMapping,
    LayAlignLayerFusion,
)
from .sequence_layalign import (
    assemble_sequence,
    decoding_sequence,
    is_prepared_llm_mask,
    positions_from_mask,
    prefix_mask,
)


class LayAlignPreTrainedModel(PreTrainedModel):
    """Initialisation of the LayAlign modules, and which parts train: the LayAlign modules listed in
    `layalign_module_names`, the bases as `train_encoder` / `train_llm` say."""

    config: LayAlignConfig
    config_class = LayAlignConfig
    base_model_prefix = "layalign"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Full checkpoints with per-layer gates: `legacy_layalign.load_gates_of_full_checkpoint` loads (or refuses) them.
    _keys_to_ignore_on_load_unexpected = [PER_LAYER_GATES_PATTERN]
    _keys_to_ignore_on_load_missing = [GATES_KEY_PATTERN]

    def _init_weights(self, module: nn.Module):
        if isinstance(module, LayAlignBoundary):
            init.zeros_(module.embedding)
        elif isinstance(module, LayAlignGates):
            init.zeros_(module.weight)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)

    def apply_trainable_parts(self) -> None:
        """Sets `requires_grad` from the config: the LayAlign modules train, the bases as `train_encoder` / `train_llm`
        say. A base that trains no longer equals its named source (`config.modified_bases`)."""
        for base, trains in (("encoder", self.config.train_encoder), ("llm", self.config.train_llm)):
            getattr(self, base).requires_grad_(trains)
            if trains:
                self.mark_base_modified(base, "it trains")
        for name in self.layalign_module_names:
            if (module := getattr(self, name)) is not None:
                module.requires_grad_(True)

    def train(self, mode: bool = True) -> "LayAlignPreTrainedModel":
        """`nn.Module.train`; the frozen encoder's dropout stays on in training unless `encoder_dropout_in_training`
        is off. The reference code puts the whole model in train mode (`finetune.py`), frozen encoder included."""
        super().train(mode)
        if mode and not self.config.encoder_dropout_in_training:
            self.encoder.eval()
        return self

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """`PreTrainedModel.activation_checkpointing_enable` (also reached through `gradient_checkpointing_enable`).

        The fused keys and values reach the LLM layers as a keyword argument shared by all of them; reentrant
        checkpointing cannot differentiate through such inputs, so only the non-reentrant kind (the default) runs.
        """
        if (activation_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "LayAlign supports only non-reentrant activation checkpointing: pass `use_reentrant=False` (the "
                "default) in `gradient_checkpointing_kwargs`."
            )
        super().activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)


class LayAlignForCausalLM(LayAlignCheckpointMixin, LayAlignGenerationMixin, LayAlignPreTrainedModel):
    """An English-centric LLM that reads a multilingual encoder's view of the source text.

    Children: `encoder` and `llm` (the two pretrained models, frozen by default) and the LayAlign modules listed in
    `layalign_module_names`: `input_mapping`, `boundary`, `fusion` and `gates` (one gate per adapted LLM
    layer). Build one for training with [`from_base_models`].
    """

    layalign_module_names = ("input_mapping", "boundary", "fusion", "gates")

    def __init__(self, config: LayAlignConfig, encoder: PreTrainedModel | None = None, llm: PreTrainedModel | None = None):
        super().__init__(config)
        self.llm_family = llm_family(config.text_config)
        self.encoder_family = encoder_family(config.encoder_config)
        self.encoder = encoder if encoder is not None else self.encoder_family.build(config.encoder_config)
        self.llm = llm if llm is not None else AutoModelForCausalLM.from_config(config.text_config)
        for base in (self.encoder, self.llm):
            # A config built around a loaded model's config resets its attention choice; take the base's default.
            if base.config._attn_implementation is None:
                base.config._attn_implementation = base.get_correct_attn_implementation(None)
        config.encoder_config = self.encoder.config
        config.text_config = self.llm.config
        config.modified_bases = config.modified_bases or []
        # What transformers sets on a quantized model, taken from the LLM: peft then wraps its quantized layers with
        # its quantized LoRA layers, and transformers refuses to cast the model to another dtype.
        for attribute in ("quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
            if hasattr(self.llm, attribute):
                setattr(self, attribute, getattr(self.llm, attribute))

        encoder_width, llm_width = config.encoder_config.hidden_size, config.text_config.hidden_size
        self.input_mapping = LayAlignInputMapping(encoder_width, llm_width) if config.use_input_mapping else None
        self.boundary = LayAlignBoundary(llm_width) if config.use_input_mapping else None
        self.fusion = self.gates = None
        if config.use_layer_fusion:
            num_fused, num_adapted = len(config.fused_encoder_layers), len(config.adapted_llm_layers)
            self.fusion = LayAlignLayerFusion(num_fused, num_adapted, encoder_width, llm_width, config.fusion_structure)
            self.gates = LayAlignGates(config.adapted_llm_layers)
        self._use_fused_attention()
        # Where the gate and the encoder mask can scale the value sources rather than the projected values: a
        # linear map without bias commutes with the scale (one product for every layer instead of one per layer).
        # LLM layer index -> its position among the adapted layers (and in the fusion's sources).
        self._fused_slots = {layer: slot for slot, layer in enumerate(config.adapted_llm_layers)}
        self._scale_value_sources = config.use_layer_fusion and all(
            attention.v_proj.bias is None for attention in self._adapted_attention_modules()
        )
        self.post_init()
        self.apply_trainable_parts()
        # Every label of `input_ids` is predicted, the first one from the boundary. Without a (shifting) loss type,
        # `Trainer` counts all of them when it normalises the loss, instead of dropping each row's first label.
        self.loss_type = None

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.llm.set_output_embeddings(value)

    def _use_fused_attention(self) -> None:
        """Points the LLM at the LayAlign wrapper of whatever attention implementation it currently uses.

        Called at every forward, so a later `set_attn_implementation` by the user keeps the fused branch.
        """
        current = self.llm.config._attn_implementation or "eager"
        if not current.startswith("layalign_"):
            self.llm.config._attn_implementation = fused_attention_implementation(current)

    def _adapted_attention_modules(self) -> list[nn.Module]:
        layers = self.llm.get_decoder().layers
        return [layers[index].self_attn for index in self.config.adapted_llm_layers]

    # -- encoder side ---------------------------------------------------------------------------------------------------

    def encode(
        self, encoder_input_ids: torch.LongTensor, encoder_attention_mask: torch.Tensor | None = None
    ) -> LayAlignEncoderOutput:
        """Runs the encoder once and computes everything the LLM side needs from it.

        Args:
            encoder_input_ids: `(batch, encoder_len)` source-text token ids from the encoder's tokenizer.
            encoder_attention_mask: `(batch, encoder_len)`, 1 on real tokens, 0 on padding (either side).

        Pass the result's fields to `forward` (`mapped_encoder_embeds`, `fused_states`, `encoder_attention_mask`) to
        reuse one encoding across several calls; `generate` does this by itself. The adapted layers' frozen `k_proj` /
        `v_proj` are not applied here: each layer projects its own sources inside its forward (see
        `attention_layalign.FusedAttentionInputs`).
        """
        encoder_attention_mask = check_encoder_inputs(
            encoder_input_ids, encoder_attention_mask, self.encoder_family.max_length(self.config.encoder_config)
        )
        vocab_size = self.encoder.get_input_embeddings().num_embeddings
        check_token_range("encoder_input_ids", encoder_input_ids, vocab_size, "the encoder")
        encoder_kwargs = {}
        if self.encoder_family.causal:
            encoder_kwargs["position_ids"] = positions_from_mask(encoder_attention_mask)
        encoder_trains = any(parameter.requires_grad for parameter in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):
            encoded = self.encoder(
                input_ids=encoder_input_ids,
                attention_mask=encoder_attention_mask,
                output_hidden_states=True,
                return_dict=True,
                **encoder_kwargs,
            )
        mapped_embeds = fused_states = None
        if self.input_mapping is not None:
            dtype = next(self.input_mapping.parameters()).dtype
            mapped_embeds = self.input_mapping(mapped_encoder_states(encoded, self.config).to(dtype))
        if self.fusion is not None:
            dtype = next(self.fusion.parameters()).dtype
            layers = torch.stack([encoded.hidden_states[i] for i in self.config.fused_encoder_layers], dim=-1)
            fused_states = self.fusion(layers.to(dtype))
        return LayAlignEncoderOutput(
            mapped_embeds=mapped_embeds, fused_states=fused_states, attention_mask=encoder_attention_mask
        )

    # -- LLM side -------------------------------------------------------------------------------------------------------

    def num_prefix_positions(self, encoder_len: int) -> int:
        """Length of `[BOS, mapped encoder tokens, boundary]`, the part of the LLM sequence in front of `input_ids`."""
        has_bos = self.config.text_config.bos_token_id is not None
        return int(has_bos) + (encoder_len + 1 if self.config.use_input_mapping else 0)

    def _prefix_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        """`(batch, num_prefix_positions)` mask of `[BOS, mapped encoder tokens, boundary]`."""
        has_bos = self.config.text_config.bos_token_id is not None
        return prefix_mask(encoder_attention_mask, has_bos, self.config.use_input_mapping)

    def _prefix_embeds(self, mapped_embeds: torch.Tensor | None, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        parts = []
        bos_token_id = self.config.text_config.bos_token_id
        if bos_token_id is not None:
            bos = torch.full((batch_size, 1), bos_token_id, dtype=torch.long, device=like.device)
            parts.append(self.llm.get_input_embeddings()(bos))
        if self.config.use_input_mapping:
            parts += [mapped_embeds.to(like.dtype), self.boundary(batch_size).to(like.dtype)]
        return torch.cat(parts, dim=1)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_input_ids: torch.LongTensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        mapped_encoder_embeds: torch.Tensor | None = None,
        fused_states: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            input_ids: `(batch, text_len)` LLM token ids of the text that follows the prefix (prompt and target),
                without BOS: the model puts `[BOS, mapped encoder tokens, boundary]` in front itself.
            attention_mask: `(batch, text_len)` for `input_ids`; while decoding with a cache, `(batch, past_text_len
                + text_len)` over all text seen so far. The prefix's mask comes from `encoder_attention_mask`. While
                decoding with a static cache, `generate` passes the LLM's own prepared mask instead (see
                [`prepare_inputs_for_generation`]).
            encoder_input_ids: `(batch, encoder_len)` source-text ids from the encoder's tokenizer. Not needed when
                `mapped_encoder_embeds` / `fused_states` (from [`encode`]) are given, nor while the cache holds the
                fused keys and values.
            encoder_attention_mask: `(batch, encoder_len)`, 1 on real source tokens. Needed at every step of
                incremental decoding, since the cached prefix keeps its padding.
            mapped_encoder_embeds: `(batch, encoder_len, d_llm)` from [`encode`]; read on the first pass only.
            fused_states: `(batch, encoder_len, 2 * num_adapted_layers, d_llm)` from [`encode`], the fusion's sources
                of every adapted layer's keys and values; read on a pass whose cache does not hold their projections.
            position_ids: `(batch, text_len)` positions of the text counted from its first token (what `generate`
                derives from `attention_mask`); the number of real prefix positions is added. Derived from the
                masks when omitted, so padding anywhere never shifts an example's positions.
            cache: an `EncoderDecoderCache` whose self-attention half is the LLM's cache and whose cross-attention half
                holds the fused keys and values of every adapted layer, projected on the first pass (what this
                forward returns with `use_cache=True`, and what `generate` builds). A plain LLM cache is wrapped in
                one. `past_key_values` is accepted as the old name.
            labels: `(batch, text_len)` targets for `input_ids`, -100 where no loss is wanted (prompt, padding).
            `return_dict=False` returns the output as a tuple, as transformers models do.

        Returns:
            The LLM's `CausalLMOutputWithPast` over the whole sequence it read: on the first pass `logits` has
            `num_prefix_positions(encoder_len) + text_len` positions (prefix first), then `text_len` per step.
        """
        self._use_fused_attention()
        llm_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if input_ids is not None:
            check_token_ids("input_ids", input_ids)
            embeddings = self.llm.get_input_embeddings()
            check_token_range("input_ids", input_ids, embeddings.num_embeddings, "the LLM")
            inputs_embeds = embeddings(input_ids)
        batch_size, text_len = inputs_embeds.shape[:2]
        prepared_mask = is_prepared_llm_mask(attention_mask)
        # (A static cache counts its length in a tensor; a prepared mask means a decoding step, without reading it.)
        past_len = 0 if llm_cache is None or prepared_mask else int(llm_cache.get_seq_length())
        is_first_pass = past_len == 0 and not prepared_mask
        if labels is not None:
            check_labels(labels, (batch_size, text_len))

        fused_cached = isinstance(cache, EncoderDecoderCache) and cache.is_updated.get(0, False)
        mapped_encoder_embeds, fused_states, encoder_attention_mask = self._encoder_side(
            encoder_input_ids, encoder_attention_mask, mapped_encoder_embeds, fused_states, is_first_pass, fused_cached
        )
        if encoder_attention_mask.shape[0] != batch_size:
            raise ValueError(
                f"The encoder inputs hold {encoder_attention_mask.shape[0]} examples but the LLM inputs hold "
                f"{batch_size}; each example needs both."
            )
        num_adapted = len(self.config.adapted_llm_layers) if self.config.use_layer_fusion else 0
        cache = cache_for_pass(
            llm_cache if cache is None else cache, use_cache, self.config.text_config, num_adapted, encoder_attention_mask.shape[1]
        )
        if isinstance(cache, EncoderDecoderCache):
            llm_cache = cache.self_attention_cache

        prefix = self._prefix_mask(encoder_attention_mask)
        if prepared_mask:
            sequence = decoding_sequence(prefix, inputs_embeds, attention_mask, position_ids)
        else:
            sequence = assemble_sequence(
                prefix,
                inputs_embeds,
                attention_mask,
                past_len=past_len,
                prefix_embeds=self._prefix_embeds(mapped_encoder_embeds, batch_size, inputs_embeds) if is_first_pass else None,
                position_ids=position_ids,
                labels=labels if is_first_pass else None,
            )
        fused_inputs = None
        if self.config.use_layer_fusion:
            fused_inputs = fused_attention_inputs(
                None if fused_cached else fused_states,
                encoder_attention_mask,
                cache.cross_attention_cache if isinstance(cache, EncoderDecoderCache) else None,
                self.gates,
                self._scale_value_sources,
                self._fused_slots,
                self.llm_family,
                self.llm.get_input_embeddings().weight.dtype,
            )
        outputs = self.llm(
            inputs_embeds=sequence.inputs_embeds,
            attention_mask=sequence.attention_mask,
            position_ids=sequence.position_ids,
            cache=llm_cache,
            labels=sequence.labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            layalign_fused=fused_inputs,
            **kwargs,
        )
        if outputs.logits is not None:
            outputs.logits = sequence.unsort(outputs.logits)
        if isinstance(cache, EncoderDecoderCache):
            if fused_inputs is not None:
                cache.is_updated.update(dict.fromkeys(range(len(self.config.adapted_llm_layers)), True))
            outputs.cache = cache
        return outputs

    def _encoder_side(
        self,
        encoder_input_ids: torch.LongTensor | None,
        encoder_attention_mask: torch.Tensor | None,
        mapped_encoder_embeds: torch.Tensor | None,
        fused_states: torch.Tensor | None,
        is_first_pass: bool,
        fused_cached: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """`(mapped_encoder_embeds, fused_states, encoder_attention_mask)` for this pass, encoding only what is missing.

        The mapped tokens are read on the first pass only; the fused sources on every pass whose cache does not hold
        their projections yet. The mask defaults to all ones over the encoder length.
        """
        needs_mapped = is_first_pass and self.config.use_input_mapping and mapped_encoder_embeds is None
        needs_fused = self.config.use_layer_fusion and fused_states is None and not fused_cached
        if needs_mapped or needs_fused:
            if encoder_input_ids is None:
                raise ValueError(
                    "`encoder_input_ids` is required: LayAlign reads the source text through its encoder. Pass the "
                    "encoder tokenizer's ids (or `mapped_encoder_embeds` and `fused_states` from `model.encode`)."
                )
            encoded = self.encode(encoder_input_ids, encoder_attention_mask)
            mapped_encoder_embeds = encoded.mapped_embeds if mapped_encoder_embeds is None else mapped_encoder_embeds
            fused_states = encoded.fused_states if fused_states is None else fused_states
            return mapped_encoder_embeds, fused_states, encoded.attention_mask
        if encoder_attention_mask is None:
            encoder_attention_mask = all_ones_encoder_mask(encoder_input_ids, mapped_encoder_embeds, fused_states)
        return mapped_encoder_embeds, fused_states, encoder_attention_mask


LayAlignForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["LayAlignPreTrainedModel", "LayAlignForCausalLM", "LayAlignEncoderOutput"]
