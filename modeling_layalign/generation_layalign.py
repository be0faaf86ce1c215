"""Generation for `LayAlignForCausalLM`: the encoder once per call, and static caches.

The stock `GenerationMixin` works as is with a dynamic cache, once `generate` has run the encoder (the results travel
as batch-first model kwargs, which it repeats for beams and samples). The cache is an `EncoderDecoderCache`, as in
encoder-decoder models: the LLM's cache, and the fused keys and values that each adapted layer projects on the first
pass and reads back at every later step. A static cache (`cache_implementation="static"`,
and with it `generate`'s automatic `torch.compile` of the decoding step on GPUs) needs three more changes, all because
the LLM caches `[BOS, mapped encoder tokens, boundary]` in front of the text that `generate` sees. The reference code
(`LayAlign.py`) generates through `llm.generate(inputs_embeds=...)` with a dynamic cache only.
"""

import torch
from transformers import GenerationMixin
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.masking_utils import create_masks_for_generate

from .cache_layalign import check_cache_to_continue, with_fused_states_cache
from .inputs_layalign import check_token_range
from .sequence_layalign import padding_to_front, positions_from_mask


class LayAlignGenerationMixin(GenerationMixin):
    """`generate` for [`LayAlignForCausalLM`], which provides `encode`, `num_prefix_positions`, `_prefix_mask` and
    `llm`."""

    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_input_ids: torch.LongTensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate`, with the encoder run once on the un-expanded batch.

        The encoder and the fusion run here, once per call; their results go to the stock `generate` as batch-first
        tensors, which it repeats for beams / samples / `num_return_sequences`. The first pass reads them (each
        adapted layer projecting its fused keys and values into the cache) and later steps read the cache.
        `input_ids` (the prompt, left-padded in batches) may be omitted to generate right after the boundary, as in
        stage-1 translation. The returned sequences are `input_ids` followed by the new tokens, decodable with the
        LLM's tokenizer.

        To continue a generation (a chat's next turn), pass its `sequences`, extended or not, as `input_ids` with the
        `past_key_values` it returned as `cache` and the same encoder inputs: the result is the one continuous
        generation would give. A cache that cannot hold this call's past is refused.
        """
        if encoder_input_ids is None:
            raise ValueError("`encoder_input_ids` is required: LayAlign generates from the source text it encodes.")
        self._check_generation_inputs(input_ids, attention_mask, encoder_input_ids, kwargs)
        with torch.no_grad():
            encoded = self.encode(encoder_input_ids, encoder_attention_mask)
        if input_ids is None and "inputs_embeds" not in kwargs:
            # An empty prompt: generation starts right after the boundary. Handed over as zero-length embeddings,
            # the one empty input `generate` accepts.
            # (Shaped from the config: under sharding the embedding weight is not whole outside a forward pass.)
            batch_size = encoder_input_ids.shape[0]
            width = self.config.text_config.hidden_size
            kwargs["inputs_embeds"] = torch.zeros(batch_size, 0, width, dtype=self.llm.dtype, device=encoder_input_ids.device)
            attention_mask = encoded.attention_mask.new_zeros(batch_size, 0)
        for name, value in (("mapped_encoder_embeds", encoded.mapped_embeds), ("fused_states", encoded.fused_states)):
            if value is not None:
                kwargs[name] = value
        return super().generate(
            input_ids=input_ids, attention_mask=attention_mask, encoder_attention_mask=encoded.attention_mask, **kwargs
        )

    def _check_generation_inputs(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        encoder_input_ids: torch.LongTensor,
        kwargs: dict,
    ) -> None:
        """Refuses, before any pass, what `generate` cannot honour.

        - Two sources of the encoder's states: `mapped_encoder_embeds` / `fused_states` next to `encoder_input_ids`.
        - A draft model: assisted decoding drafts with another model (`assistant_model`) or with the LLM's first layers
          (`assistant_early_exit`); neither reads the source. (Prompt lookup drafts from the text and works.)
        - Token ids outside either embedding table (checked here on every device; the passes check only on the CPU,
          where reading the ids is free).
        - A cache that cannot hold this call's past (see `cache_layalign.check_cache_to_continue`).
        """
        if given := [name for name in ("mapped_encoder_embeds", "fused_states") if kwargs.get(name) is not None]:
            raise ValueError(
                f"`generate` encodes `encoder_input_ids` itself; {', '.join(f'`{name}`' for name in given)} would be a "
                "second source of the same states: pass `encoder_input_ids` (and `encoder_attention_mask`) only."
            )
        config = kwargs.get("generation_config") or self.generation_config
        early_exit = kwargs.get("assistant_early_exit", getattr(config, "assistant_early_exit", None))
        for name, value in (("assistant_model", kwargs.get("assistant_model")), ("assistant_early_exit", early_exit)):
            if value is not None:
                raise ValueError(
                    f"`{name}` cannot draft for LayAlign: the draft would not read the source. Leave it unset; "
                    "`prompt_lookup_num_tokens` (drafts copied from the prompt) speeds up LayAlign's decoding."
                )
        for name, ids, base, owner in (
            ("input_ids", input_ids, self.llm, "the LLM"),
            ("encoder_input_ids", encoder_input_ids, self.encoder, "the encoder"),
        ):
            if isinstance(ids, torch.Tensor):
                check_token_range(name, ids, base.get_input_embeddings().num_embeddings, owner, always=True)
        if (cache := kwargs.get("cache", kwargs.get("past_key_values"))) is not None:
            text = attention_mask if attention_mask is not None else input_ids
            encoder_len = encoder_input_ids.shape[1]
            check_cache_to_continue(
                cache,
                batch_size=encoder_input_ids.shape[0],
                text_len=0 if text is None else text.shape[1],
                num_prefix_positions=self.num_prefix_positions(encoder_len),
                num_llm_layers=self.config.text_config.num_hidden_layers,
                num_adapted_layers=len(self.config.adapted_llm_layers) if self.config.use_layer_fusion else 0,
                encoder_len=encoder_len,
            )

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """`GenerationMixin._prepare_cache_for_generation`, with room for `[BOS, mapped encoder tokens, boundary]`
        (`generate` sizes a static cache from `input_ids` and `max_new_tokens` alone), paired with a cache for the
        fused keys and values: static layers of the encoder's length next to a static LLM cache, so the decoding step
        reads tensors of fixed address and shape."""
        encoder_len = model_kwargs["encoder_attention_mask"].shape[1]
        max_cache_length += self.num_prefix_positions(encoder_len)
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        llm_cache = model_kwargs.get("cache")
        if not self.config.use_layer_fusion or llm_cache is None or isinstance(llm_cache, EncoderDecoderCache):
            return
        model_kwargs["cache"] = with_fused_states_cache(llm_cache, len(self.config.adapted_llm_layers), encoder_len)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, *args, **kwargs) -> dict:
        """`GenerationMixin._update_model_kwargs_for_generation`; once the cache holds the prefix and the fused keys
        and values, the encoder's outputs are dropped from the model kwargs (no step reads them again)."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if model_kwargs.get("cache") is not None:
            model_kwargs.pop("mapped_encoder_embeds", None)
            model_kwargs.pop("fused_states", None)
        return model_kwargs

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
        """Keeps the 2-D text mask: the stock function would build the LLM's mask over the text alone.
        `prepare_inputs_for_generation` builds it over the prefix too."""
        return attention_mask

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool = False,
        **kwargs,
    ) -> dict:
        """`GenerationMixin.prepare_inputs_for_generation`; with a static cache, decoding steps get the LLM's mask.

        The mask is the one `forward` would build, `[BOS, mapped encoder tokens, boundary, text]` with each row's
        padding in front, made 4-D over the whole cache here, before the forward pass: every decoding step then has
        the same shapes, which is what lets `generate` compile the step. The first pass keeps the 2-D text mask, since
        `forward` lays out the prefix then.
        """
        if is_first_iteration and kwargs.get("next_sequence_length") is not None and cache is not None:
            # Continuing from a cache: the stock count of new tokens takes every cached position for text, but the
            # cache also holds `[BOS, mapped encoder tokens, boundary]`.
            kwargs["next_sequence_length"] += self.num_prefix_positions(kwargs["encoder_attention_mask"].shape[1])
        inputs = super().prepare_inputs_for_generation(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if is_first_iteration or cache is None or not cache.is_compileable:
            return inputs
        return self._with_prepared_llm_mask(inputs, input_ids, cache)

    def _with_prepared_llm_mask(self, inputs: dict, input_ids: torch.LongTensor, cache: Cache) -> dict:
        """A decoding step's inputs with the LLM's mask over the whole static cache, and the text's positions.

        Args:
            inputs: what the stock `prepare_inputs_for_generation` returned, its `attention_mask` 2-D over the text.
            input_ids: `(batch, text_len)`, all the text so far (prompt and generated tokens).
        """
        text_mask = inputs.get("attention_mask")
        if text_mask is None:
            text_mask = torch.ones_like(input_ids)
        step_ids = inputs["input_ids"]
        # (`generate` cannot extend the positions of an empty prompt; the text's mask gives them in every case. A
        # fresh copy, so that the strides too are the same at every step.)
        positions = positions_from_mask(text_mask)[:, -step_ids.shape[1] :]
        inputs["position_ids"] = positions.clone(memory_format=torch.contiguous_format)
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        prefix = self._prefix_mask(inputs["encoder_attention_mask"])
        llm_mask, _ = padding_to_front(torch.cat([prefix, text_mask.to(prefix.dtype)], dim=1))
        llm_mask = create_masks_for_generate(
            config=self.llm.config,
            # Only the batch size, query length, dtype and device are read.
            inputs_embeds=torch.empty((*step_ids.shape, 0), dtype=self.llm.dtype, device=step_ids.device),
            attention_mask=llm_mask,
            cache=cache,  # (with a mask and a cache, position ids would go unread: they only detect packed rows)
        )
        if isinstance(llm_mask, dict):
            inputs["attention_mask"] = {kind: mask.contiguous() for kind, mask in llm_mask.items()}
        elif llm_mask is not None:
            inputs["attention_mask"] = llm_mask.contiguous()
        return inputs
