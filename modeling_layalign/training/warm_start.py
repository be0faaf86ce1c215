"""A warm start for the input mapping: fit it, before stage 1, to put text where the LLM reads the same English.

Not in the paper, which starts the input mapping from random weights (Ruan et al. 2025, arXiv 2502.11405, Sec. 3;
the reference code's `MLP` in `LayAlign.py`). On a small budget that start collapses: the cheapest way to lower
the stage-1 loss is one constant soft prompt for "an English sentence of this kind", and the mapped tokens of every
source converge to it (`monitoring.py` measures this). The warm start gives the mapping content from the first step.

It needs text and the two frozen models, and no LLM forward pass. Every encoder token gets a target in the LLM's
input-embedding space, and the mapping is fitted to it by mean squared error:

- in an English sentence, the mean input embedding of the LLM tokens that cover the same characters;
- in a source sentence of a translation pair, a soft alignment to its English target's encoder tokens, by cosine
  similarity of the encoder's states at `alignment_layer` (a middle layer: multilingual encoders align words
  across languages best there, as SimAlign found for mBERT), carried over to those tokens' targets.

Stage 1 then trains as usual from there. The architecture is unchanged; a checkpoint made this way loads like any
other.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import logging

from ..encoders_layalign import mapped_encoder_states


logger = logging.get_logger(__name__)


@dataclass
class _EncodedText:
    """One text through the encoder: `states` `(len, d_enc)` the states the input mapping reads, `aligned`
    `(len, d_enc)` states of the alignment layer, `embeddings` `(len, d_llm)` LLM targets (English only), on its
    content tokens only."""

    states: torch.Tensor
    aligned: torch.Tensor
    embeddings: torch.Tensor | None


@torch.no_grad()
def _encode(model, processor, texts: list[str], alignment_layer: int, english: bool, batch_size: int = 32):
    """Yields an `_EncodedText` per text; the content tokens are those covering characters of the text itself."""
    encoder_tokenizer, tokenizer = processor.encoder_tokenizer, processor.tokenizer
    embeddings = model.get_input_embeddings().weight
    prefix = len(processor.encoder_text_prefix)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        encoded = encoder_tokenizer(
            [processor.encoder_text_prefix + text for text in chunk],
            return_offsets_mapping=True,
            truncation=True,
            max_length=processor.max_source_length,
            padding=True,
            return_tensors="pt",
        )
        offsets = encoded.pop("offset_mapping").tolist()
        mask = encoded["attention_mask"].tolist()
        outputs = model.encoder(**encoded.to(model.device), output_hidden_states=True)
        mapped = mapped_encoder_states(outputs, model.config)
        for row, text in enumerate(chunk):
            llm_tokens = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False) if english else None
            positions, targets = [], []
            for position, (begin, end) in enumerate(offsets[row]):
                begin, end = begin - prefix, end - prefix
                if not mask[row][position] or end <= max(begin, 0):
                    continue
                if llm_tokens is None:
                    positions.append(position)
                    continue
                ids = [
                    token
                    for token, (token_begin, token_end) in zip(llm_tokens["input_ids"], llm_tokens["offset_mapping"])
                    if token_begin < end and token_end > begin
                ]
                if ids:
                    positions.append(position)
                    targets.append(embeddings[ids].float().mean(dim=0))
            yield _EncodedText(
                states=mapped[row, positions].float(),
                aligned=outputs.hidden_states[alignment_layer][row, positions].float(),
                embeddings=torch.stack(targets) if targets else None,
            )


def _check_fast_tokenizers(processor) -> None:
    for name in ("encoder_tokenizer", "tokenizer"):
        if not getattr(processor, name).is_fast:
            raise ValueError(f"The warm start aligns tokens by character offsets: the processor's `{name}` must be fast.")


def aligned_token_pairs(model, processor, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final encoder states of the tokens of English `sentences`, each with the LLM embeddings of its characters.

    Returns:
        `(states, embeddings)`: `(num_pairs, d_enc)` and `(num_pairs, d_llm)`, float32. Encoder tokens with no
        character of the sentence (special tokens, the `encoder_text_prefix`) are left out.
    """
    _check_fast_tokenizers(processor)
    states, targets = [], []
    for text in _encode(model, processor, sentences, alignment_layer=-1, english=True):
        if text.embeddings is not None:
            states.append(text.states)
            targets.append(text.embeddings)
    if not states:
        raise ValueError("No encoder token shares characters with an LLM token: pass non-empty English sentences.")
    return torch.cat(states), torch.cat(targets)


def translated_token_pairs(
    model, processor, sources: list[str], targets: list[str], alignment_layer: int, temperature: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final encoder states of the tokens of `sources`, each with a soft alignment of its English target's embeddings.

    Source token `i` gets `sum_j softmax_j(cos(a_i, b_j) / temperature) * e_j`, where `a` / `b` are the encoder's
    states at `alignment_layer` for the source / target tokens and `e_j` the LLM embeddings of target token `j`'s
    characters. Returns `(states, embeddings)` as [`aligned_token_pairs`] does.
    """
    _check_fast_tokenizers(processor)
    if len(sources) != len(targets):
        raise ValueError(f"`sources` and `targets` must pair up, got {len(sources)} and {len(targets)} texts.")
    states, aligned = [], []
    encoded_sources = _encode(model, processor, sources, alignment_layer, english=False)
    encoded_targets = _encode(model, processor, targets, alignment_layer, english=True)
    for source, target in zip(encoded_sources, encoded_targets):
        if target.embeddings is None or not len(source.states):
            continue
        similarity = F.normalize(source.aligned, dim=-1) @ F.normalize(target.aligned, dim=-1).T
        states.append(source.states)
        aligned.append(torch.softmax(similarity / temperature, dim=-1) @ target.embeddings)
    if not states:
        raise ValueError("No translation pair has content tokens on both sides: pass non-empty sources and targets.")
    return torch.cat(states), torch.cat(aligned)


def warm_start_input_mapping(
    model,
    processor,
    sentences: list[str],
    translation_pairs: tuple[list[str], list[str]] | None = None,
    *,
    alignment_layer: int | None = None,
    steps: int = 600,
    batch_size: int = 1024,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Fits `model.input_mapping` to send the encoder's view of text to the LLM's embeddings of the same English.

    Args:
        model: a `LayAlignForCausalLM` with input mapping (any dtype; the fit runs in the mapping's own).
        processor: its `LayAlignProcessor` (both tokenizers fast; `encoder_text_prefix` is applied).
        sentences: English training text, none of it held out for evaluation.
        translation_pairs: optional `(sources, english_targets)` training pairs; their source tokens are fitted
            to soft-aligned target embeddings (see [`translated_token_pairs`]).
        alignment_layer: encoder hidden state used to align pairs; defaults to two thirds of the encoder's depth.
        steps, batch_size, learning_rate: Adam on the mean squared error, over random token pairs.

    Returns:
        `pairs` (token pairs fitted), `mse` and `cosine` (between mapped states and targets, over all pairs).
    """
    if model.input_mapping is None:
        raise ValueError("The model has no input mapping to warm-start (`use_input_mapping=False`).")
    was_training = model.training
    model.eval()
    try:
        states, targets = aligned_token_pairs(model, processor, sentences)
        if translation_pairs is not None:
            if alignment_layer is None:
                alignment_layer = (2 * model.config.encoder_config.num_hidden_layers) // 3
            pair_states, pair_targets = translated_token_pairs(model, processor, *translation_pairs, alignment_layer)
            states, targets = torch.cat([states, pair_states]), torch.cat([targets, pair_targets])
    finally:
        model.train(was_training)
    return _fit(model.input_mapping, states, targets, steps, batch_size, learning_rate, seed)


def _fit(mapping, states, targets, steps: int, batch_size: int, learning_rate: float, seed: int) -> dict[str, float]:
    parameter = next(mapping.parameters())
    states, targets = states.to(parameter.device, parameter.dtype), targets.to(parameter.device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(mapping.parameters(), lr=learning_rate)
    for _ in range(steps):
        index = torch.randint(0, states.shape[0], (batch_size,), generator=generator).to(states.device)
        loss = F.mse_loss(mapping(states[index]).float(), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        mapped = mapping(states).float()
        result = {
            "pairs": float(states.shape[0]),
            "mse": F.mse_loss(mapped, targets).item(),
            "cosine": F.cosine_similarity(mapped, targets, dim=-1).mean().item(),
        }
    logger.info(f"Warm-started the input mapping: {result}.")
    return result
