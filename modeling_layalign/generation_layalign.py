"""Generation for `LayAlignForCausalLM`: the encoder once per call, and static caches.

The stock `GenerationMixin` works as is with a dynamic cache, once `generate` has run the encoder (the results travel
as batch-first model kwargs, which it repeats for beams and samples). A static cache (`cache_implementation="static"`,
and with it `generate`'s automatic `torch.compile` of the decoding step on GPUs) needs three more changes, all because
the LLM caches `[BOS, mapped encoder tokens, boundary]` in front of the text that `generate` sees. The reference code
(`LayAlign.py`) generates through `llm.generate(inputs_embeds=...)` with a dynamic cache only.
"""

import torch
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.masking_utils import create_masks_for_generate

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

        The encoder, the fusion and every adapted layer's k/v projection run here, once per call; their results go
        to the stock `generate` as batch-first tensors, which it repeats for beams / samples /
        `num_return_sequences` and hands to every decoding step. `input_ids` (the prompt, left-padded in batches)
        may be omitted to generate right after the boundary, as in stage-1 translation. The returned sequences are
        `input_ids` followed by the new tokens, decodable with the LLM's tokenizer.
        """
        if encoder_input_ids is None:
            raise ValueError("`encoder_input_ids` is required: LayAlign generates from the source text it encodes.")
        with torch.no_grad():
            encoded = self.encode(encoder_input_ids, encoder_attention_mask)
        if input_ids is None and "inputs_embeds" not in kwargs:
            # An empty prompt: generation starts right after the boundary. Handed over as zero-length embeddings,
            # the one empty input `generate` accepts.
            batch_size = encoder_input_ids.shape[0]
            embedding = self.llm.get_input_embeddings().weight
            kwargs["inputs_embeds"] = embedding.new_zeros(batch_size, 0, embedding.shape[1])
            attention_mask = encoded.attention_mask.new_zeros(batch_size, 0)
        for name, value in (("mapped_encoder_embeds", encoded.mapped_embeds), ("fused_kv", encoded.fused_kv)):
            if value is not None:
                kwargs[name] = value
        return super().generate(
            input_ids=input_ids, attention_mask=attention_mask, encoder_attention_mask=encoded.attention_mask, **kwargs
        )

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """`GenerationMixin._prepare_cache_for_generation`, with room for `[BOS, mapped encoder tokens, boundary]`:
        `generate` sizes a static cache from `input_ids` and `max_new_tokens` alone."""
        encoder_len = model_kwargs["encoder_attention_mask"].shape[1]
        max_cache_length += self.num_prefix_positions(encoder_len)
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)

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
