"""Checks of what users pass to `LayAlignForCausalLM`, with errors that name the argument and say what to pass.

A wrong shape or an empty source would otherwise fail deep inside the encoder or the LLM (or, for a short attention
mask, silently drop a token and still compute a loss).
"""

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)


def check_encoder_inputs(
    encoder_input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor | None, max_length: int | None
) -> torch.Tensor:
    """Checks the source ids (2-D integer ids, 1 to `max_length` per row) and their mask; returns the mask, all ones
    when none is given."""
    check_token_ids("encoder_input_ids", encoder_input_ids)
    encoder_len = encoder_input_ids.shape[1]
    if encoder_len == 0:
        raise ValueError("`encoder_input_ids` holds no token: each example needs a source text to encode.")
    if max_length is not None and encoder_len > max_length:
        raise ValueError(
            f"`encoder_input_ids` holds {encoder_len} tokens per source, but the encoder's position table holds "
            f"{max_length}: truncate the sources (the processor's `max_source_length`)."
        )
    if encoder_attention_mask is None:
        return torch.ones_like(encoder_input_ids)
    if encoder_attention_mask.shape != encoder_input_ids.shape:
        raise ValueError(
            f"`encoder_attention_mask` has shape {tuple(encoder_attention_mask.shape)}, but `encoder_input_ids` "
            f"has shape {tuple(encoder_input_ids.shape)}; they must match."
        )
    return encoder_attention_mask


def all_ones_encoder_mask(encoder_input_ids, mapped_encoder_embeds, fused_states) -> torch.Tensor:
    """The encoder mask when none is given: all ones over the encoder length of whichever input is there."""
    if encoder_input_ids is not None:
        return torch.ones_like(encoder_input_ids)
    if mapped_encoder_embeds is not None:
        batch_size, encoder_len, device = *mapped_encoder_embeds.shape[:2], mapped_encoder_embeds.device
    elif fused_states is not None:
        batch_size, encoder_len, device = *fused_states.shape[:2], fused_states.device
    else:
        raise ValueError("`encoder_attention_mask` (or `encoder_input_ids`) is required while decoding with a cache.")
    return torch.ones(batch_size, encoder_len, dtype=torch.long, device=device)


def check_labels(labels: torch.Tensor, expected_shape: tuple[int, int]) -> None:
    if tuple(labels.shape) != expected_shape:
        raise ValueError(
            f"`labels` has shape {tuple(labels.shape)}; it must match the text, {expected_shape} (batch, text_len), "
            "with -100 where no loss is wanted."
        )
    # Read the labels' values only where that is free: on an accelerator it is a host-device sync that would stall
    # every training step (the one this model would add to a step), and while compiling it would split the graph.
    # Batches from `LayAlignProcessor` always keep a target token; `Trainer` counts targets on the CPU.
    if labels.device.type == "cpu" and not torch.compiler.is_compiling() and not (labels != -100).any():
        logger.warning_once(
            "`labels` hold no target token (all -100): the loss of this batch is not defined. Check that the "
            "targets survive truncation (`max_length`)."
        )


def check_token_ids(name: str, ids: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"`{name}` must be a 2-D tensor of token ids (batch, length), got {_describe(ids)}.")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold integer token ids, got dtype {ids.dtype}.")


def check_token_range(name: str, ids: torch.Tensor, vocab_size: int, owner: str, always: bool = False) -> None:
    """Refuses ids outside `[0, vocab_size)` of `owner`'s embedding table (after `resize_token_embeddings` shrank
    it, or with another tokenizer), which would fail in the embedding lookup without naming the argument.

    Read only where that is free (see `check_labels`), unless `always` (once per `generate` call)."""
    if not always and (ids.device.type != "cpu" or torch.compiler.is_compiling()):
        return
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"`{name}` holds token ids from {int(ids.min())} to {int(ids.max())}, but {owner}'s embedding table has "
            f"{vocab_size} rows: use the tokenizer the model was trained with (resize the embeddings for new tokens)."
        )


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
