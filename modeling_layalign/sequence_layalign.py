"""The sequence the LLM reads: `[BOS, mapped encoder tokens, boundary, text]`, with its padding moved to the front.

The reference code builds the same sequence in `LayAlign.forward` (`LayAlign.py`) and moves padding with
`squeeze_pad`; it then lets the LLM number positions 0..T-1 over every column, padding included, in training, and
from the attention mask in generation. Here positions always count real tokens only (a deliberate difference), so
an example's result never depends on how much padding its batch needed.
"""

from dataclasses import dataclass

import torch


@dataclass
class LLMSequence:
    """What the LLM reads in one forward pass.

    Attributes:
        inputs_embeds: `(batch, new_len, d_llm)` embeddings of the positions this pass adds (`None` for a pass that
            only extends the cache with text the caller embeds).
        attention_mask: `(batch, past_len + new_len)`, every row's padding in front (a stable sort of its mask).
        position_ids: `(batch, new_len)`, each token's position among the real tokens of its row.
        labels: `(batch, new_len)` on the first pass when labels are given, `-100` on the prefix.
        order: `(batch, new_len)` on the first pass: column `t` holds what the unsorted sequence had at
            `order[:, t]`; `None` afterwards, when the cache already holds the sorted prefix.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.LongTensor
    labels: torch.LongTensor | None = None
    order: torch.LongTensor | None = None

    def unsort(self, logits: torch.Tensor) -> torch.Tensor:
        """`(batch, new_len, vocab)` logits back in the order `[prefix, text]` of the unsorted sequence."""
        if self.order is None or logits.shape[1] != self.order.shape[1]:
            return logits
        return gather_rows(logits, self.order.argsort(dim=1))


def assemble_sequence(
    prefix_mask: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    *,
    past_len: int = 0,
    prefix_embeds: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    labels: torch.LongTensor | None = None,
) -> LLMSequence:
    """Joins the prefix and the text, moves each row's padding to the front and numbers the real tokens.

    Args:
        prefix_mask: `(batch, prefix_len)`, 1 on real prefix positions (BOS, unpadded encoder tokens, boundary).
        text_embeds: `(batch, text_len, d_llm)`, the embeddings of the text this pass adds.
        text_mask: `(batch, text_len)` on the first pass; while decoding, `(batch, past_text_len + text_len)` over all
            text so far. All ones when omitted.
        past_len: length of the LLM's cache (prefix included); 0 on the first pass.
        prefix_embeds: `(batch, prefix_len, d_llm)`, required on the first pass only.
        position_ids: `(batch, text_len)` positions of the text counted from its first real token (what `generate`
            derives from the text's mask); the number of real prefix positions is added. Derived from the masks
            when omitted or of another length.
        labels: `(batch, text_len)` for the text, first pass only.

    Moving the padding to the front leaves no holes inside a row, so sliding-window layers see the same neighbours
    whatever the padding, and new tokens always follow the last real one.
    """
    is_first_pass = past_len == 0
    if is_first_pass and prefix_embeds is None:
        raise ValueError("`prefix_embeds` is required on the first pass (`past_len=0`).")
    batch_size, text_len = text_embeds.shape[:2]
    prefix_len = prefix_mask.shape[1]
    text_mask_len = past_len - (0 if is_first_pass else prefix_len) + text_len
    if text_mask is None:
        text_mask = prefix_mask.new_ones(batch_size, text_mask_len)
    elif tuple(text_mask.shape) != (batch_size, text_mask_len):
        raise ValueError(
            f"`attention_mask` has shape {tuple(text_mask.shape)}, but the text needs {(batch_size, text_mask_len)}: "
            f"one entry per token of `input_ids` {(batch_size, text_len)}"
            + ("." if is_first_pass else ", after the text already in the cache.")
        )
    full_mask = torch.cat([prefix_mask, text_mask.to(prefix_mask.dtype)], dim=1)
    new_len = text_len + (prefix_len if is_first_pass else 0)
    if position_ids is None or position_ids.shape[-1] != text_len:
        # (`generate` cannot extend position ids of an empty prompt; the masks give the same positions.)
        position_ids = positions_from_mask(full_mask)[:, -new_len:]
    else:
        position_ids = position_ids + prefix_mask.sum(dim=1, keepdim=True)
        if is_first_pass:
            position_ids = torch.cat([positions_from_mask(prefix_mask), position_ids], dim=1)
    compact_mask, order = padding_to_front(full_mask)
    if not is_first_pass:
        return LLMSequence(text_embeds, compact_mask, position_ids)
    if labels is not None:
        labels = gather_rows(torch.cat([labels.new_full((batch_size, prefix_len), -100), labels], dim=1), order)
    return LLMSequence(
        inputs_embeds=gather_rows(torch.cat([prefix_embeds.to(text_embeds.dtype), text_embeds], dim=1), order),
        attention_mask=compact_mask,
        position_ids=gather_rows(position_ids, order),
        labels=labels,
        order=order,
    )


def decoding_sequence(
    prefix_mask: torch.Tensor, text_embeds: torch.Tensor, llm_attention_mask, position_ids: torch.LongTensor
) -> LLMSequence:
    """A decoding step whose LLM mask `prepare_inputs_for_generation` already built (static caches, see
    [`LayAlignForCausalLM.prepare_inputs_for_generation`]): only the positions remain to shift past the prefix.

    Args:
        prefix_mask: `(batch, prefix_len)`, 1 on real prefix positions.
        text_embeds: `(batch, text_len, d_llm)`.
        llm_attention_mask: the LLM's own mask over its whole cache (a 4-D tensor, or a dict of them per layer type).
        position_ids: `(batch, text_len)` positions counted from the text's first real token.
    """
    if position_ids is None or position_ids.shape[-1] != text_embeds.shape[1]:
        raise ValueError(
            "A prepared (4-D) `attention_mask` needs `position_ids` of the text, (batch, text_len); `generate` passes both."
        )
    return LLMSequence(text_embeds, llm_attention_mask, position_ids + prefix_mask.sum(dim=1, keepdim=True))


def is_prepared_llm_mask(attention_mask) -> bool:
    """Whether `attention_mask` is the LLM's own mask (4-D, or a dict per layer type) rather than a 2-D text mask."""
    return attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2)


def padding_to_front(mask: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
    """`(batch, length)` mask -> (the mask with each row's padding moved to the front, the order that does it)."""
    return torch.sort(mask, dim=1, stable=True)


def prefix_mask(encoder_mask: torch.Tensor, has_bos: bool, has_mapping: bool) -> torch.Tensor:
    """`(batch, prefix_len)` mask of `[BOS, mapped encoder tokens, boundary]`: the encoder's padding, ones elsewhere."""
    ones = encoder_mask.new_ones(encoder_mask.shape[0], 1)
    parts = ([ones] if has_bos else []) + ([encoder_mask, ones] if has_mapping else [])
    return torch.cat(parts, dim=1) if parts else encoder_mask[:, :0]


def positions_from_mask(mask: torch.Tensor) -> torch.LongTensor:
    """Position of each token among the real tokens of its row; padding takes no position (and gets 0)."""
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def gather_rows(values: torch.Tensor, order: torch.LongTensor) -> torch.Tensor:
    """`values[b, order[b, t]]` for `values` of shape `(batch, length, ...)` and `order` of shape `(batch, length)`."""
    index = order.view(*order.shape, *([1] * (values.dim() - 2))).expand(*order.shape, *values.shape[2:])
    return values.gather(1, index)
