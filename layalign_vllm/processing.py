"""How a LayAlign request reaches vLLM: the source text as the one multimodal item of each request.

vLLM runs LayAlign as an encoder-decoder model (like Whisper), and an encoder-decoder model's encoder input is a
multimodal item (vLLM's scheduler asserts this). A request is

    {"prompt": <LLM text> | "prompt_token_ids": [...], "multi_modal_data": {"source": <source text> | [encoder ids]}}

- `source`: a string goes through the checkpoint's encoder tokenizer with the processor's `encoder_text_prefix` and
  `max_source_length` (what `LayAlignProcessor.encode_example` does, `modeling_layalign/processing_layalign.py`);
  a list of ints is taken as encoder token ids as they are.
- the encoder prompt is one placeholder per source token: its length sizes the request's cross-attention KV cache
  (the fused keys and values of every adapted layer);
- the decoder prompt is `[BOS] + [placeholder] * (encoder_len + 1) + prompt`, the LLM input of our `forward`
  (`[BOS, mapped encoder tokens, boundary, text]`, `modeling_layalign/sequence_layalign.py`); on the request's first
  step the model writes the mapped tokens and the boundary over the placeholders. Without input mapping (LayAlign
  fused attention only) it is `[BOS] + prompt`; an LLM without BOS (Qwen2) has none.

A request without a source is refused before it reaches the engine ([`refuse_requests_without_source`]): vLLM would
otherwise run it as the plain LLM.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoTokenizer, BatchFeature

from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser, ProcessorBatchItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseProcessingInfo,
    EncDecMultiModalProcessor,
    PromptReplacement,
)

from .families import ENCODER_FAMILIES


logger = init_logger(__name__)

MODALITY = "source"
# Token id of the placeholders in the encoder prompt and the decoder prefix. Never embedded as such: the encoder prompt
# only sizes the cross-attention cache, and the model overwrites the prefix placeholders' embeddings.
PLACEHOLDER_ID = 0
MISSING_SOURCE = (
    "LayAlign needs the source text of every request: pass it as multi_modal_data={'source': <text or encoder token "
    "ids>} next to the prompt (offline), or as the `source` (or `question`) field of POST /v1/layalign/generate "
    "(server). A request without it would run the LLM alone."
)


@dataclass(frozen=True)
class ProcessorSettings:
    """The settings of the checkpoint's `LayAlignProcessor` (its `processor_config.json`), with its defaults."""

    encoder_text_prefix: str = ""
    prompt_template: str | None = None
    max_source_length: int = 200

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ProcessorSettings":
        path = Path(folder) / "processor_config.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        return cls(**{name: saved[name] for name in cls.__dataclass_fields__ if saved.get(name) is not None})

    def prompt_for_question(self, question: str) -> str:
        """The LLM prompt for a question that is also the source: the template filled with it, or no prompt at all
        when the checkpoint has no template (as `LayAlignProcessor` does)."""
        return "" if self.prompt_template is None else self.prompt_template.format(query=question)


class SourceItems(ProcessorBatchItems):
    """The source items of a batch of requests: strings or lists of encoder token ids."""

    def __init__(self, data: Sequence[str | Sequence[int]]):
        super().__init__(data, MODALITY)


class SourceDataParser(MultiModalDataParser):
    """Parses `multi_modal_data={"source": ...}`: one string or one list of ids (one item), or a list of them."""

    def _get_subparsers(self):
        return {**super()._get_subparsers(), MODALITY: self._parse_source}

    @staticmethod
    def _parse_source(data) -> SourceItems | None:
        if data is None:
            return None
        if isinstance(data, str) or (isinstance(data, (list, tuple)) and data and isinstance(data[0], int)):
            data = [data]
        return SourceItems(list(data))


class LayAlignProcessingInfo(BaseProcessingInfo):
    """What the processor reads from the checkpoint: its config, tokenizers and processor settings."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {MODALITY: 1}

    def get_data_parser(self) -> MultiModalDataParser:
        return SourceDataParser()

    def get_default_tok_params(self):
        # The prompt follows [BOS, mapped encoder tokens, boundary]: tokenized without the LLM's special tokens.
        return super().get_default_tok_params().with_kwargs(add_special_tokens=False)

    def get_supported_mm_processor_kwargs(self) -> dict:
        return {}  # no transformers processor (the base class would load `AutoProcessor`)

    @cached_property
    def settings(self) -> ProcessorSettings:
        return ProcessorSettings.from_folder(self.ctx.model_config.model)

    def max_source_length(self) -> int:
        """The most encoder tokens of one source: the processor's `max_source_length`, within the encoder's limit.
        It sizes vLLM's profiling input, hence the cross-attention cache reserved per request."""
        encoder_config = self.get_hf_config().encoder_config
        limit = ENCODER_FAMILIES[encoder_config.model_type].max_length(encoder_config)
        return self.settings.max_source_length if limit is None else min(self.settings.max_source_length, limit)

    @cached_property
    def encoder_tokenizer(self):
        """The encoder's tokenizer: the checkpoint's `encoder_tokenizer/` (what `LayAlignProcessor.save_pretrained`
        writes), else the one of the encoder the config names."""
        folder = Path(self.ctx.model_config.model) / "encoder_tokenizer"
        source = str(folder) if folder.is_dir() else self.get_hf_config().encoder_name_or_path
        if source is None:
            raise VLLMValidationError(
                "This checkpoint has no encoder tokenizer (no `encoder_tokenizer/` folder, no `encoder_name_or_path`): "
                "pass the source as encoder token ids, or save the checkpoint's LayAlignProcessor with it.",
                parameter=MODALITY,
            )
        return AutoTokenizer.from_pretrained(source)

    def source_ids(self, source: str | Sequence[int]) -> list[int]:
        """Encoder token ids of one source, checked: not empty, not longer than [`max_source_length`]."""
        if isinstance(source, str):
            ids = self.encoder_tokenizer(
                self.settings.encoder_text_prefix + source, truncation=True, max_length=self.max_source_length()
            )["input_ids"]
        else:
            ids = [int(token) for token in source]
        if not ids:
            raise VLLMValidationError("The LayAlign source holds no token.", parameter=MODALITY)
        if len(ids) > self.max_source_length():
            raise VLLMValidationError(
                f"The LayAlign source holds {len(ids)} encoder tokens; this server takes at most "
                f"{self.max_source_length()} (the checkpoint's `max_source_length`, within the encoder's positions).",
                parameter=MODALITY,
            )
        return ids


class LayAlignDummyInputsBuilder(BaseDummyInputsBuilder[LayAlignProcessingInfo]):
    """The longest source, for vLLM's memory profiling."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        return {MODALITY: [[PLACEHOLDER_ID + 5] * self.info.max_source_length()] * mm_counts.get(MODALITY, 0)}


class LayAlignMultiModalProcessor(EncDecMultiModalProcessor[LayAlignProcessingInfo]):
    """Builds the encoder prompt (placeholders for the source) and the decoder prompt (prefix and text)."""

    skip_decoder_start_token = True  # `create_decoder_prompt` writes the whole prefix, BOS included

    def _source_ids(self, mm_items: MultiModalDataItems) -> list[list[int]]:
        if MODALITY not in mm_items:
            raise VLLMValidationError(MISSING_SOURCE, parameter=MODALITY)
        return [self.info.source_ids(item) for item in mm_items[MODALITY].get_all()]

    def create_encoder_prompt(self, prompt: str | list[int], mm_items: MultiModalDataItems) -> list[int]:
        return [PLACEHOLDER_ID]  # expanded to one per source token by `_get_prompt_updates`

    def create_decoder_prompt(self, prompt: str | list[int], mm_items: MultiModalDataItems) -> list[int]:
        config = self.info.get_hf_config()
        if isinstance(prompt, str):
            prompt = self.info.get_tokenizer().encode(prompt, add_special_tokens=False)
        bos = config.text_config.bos_token_id
        prefix = [] if bos is None else [bos]
        if config.use_input_mapping:
            prefix += [PLACEHOLDER_ID] * (len(self._source_ids(mm_items)[0]) + 1)
        return prefix + list(prompt)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        ids = [torch.tensor(self.info.source_ids(source)) for source in hf_data[f"{MODALITY}s"]]
        return BatchFeature({"source_ids": ids})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        return {"source_ids": MultiModalFieldConfig.batched(MODALITY)}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs, out_mm_kwargs):
        lengths = [len(ids) for ids in self._source_ids(mm_items)]
        return [
            PromptReplacement(
                modality=MODALITY, target=[PLACEHOLDER_ID], replacement=lambda i: [PLACEHOLDER_ID] * lengths[i]
            )
        ]


def _check_layalign_prompt(model_config, prompt: Mapping) -> None:
    """Raises `VLLMValidationError` for a LayAlign request without a source, or with its own decoder prompt (which
    would skip the prefix that `create_decoder_prompt` builds)."""
    if getattr(model_config.hf_config, "model_type", None) != "layalign":
        return
    if prompt.get("decoder_prompt") is not None:
        raise VLLMValidationError(
            "LayAlign takes one prompt with multi_modal_data={'source': ...}, not an encoder_prompt / decoder_prompt "
            "pair: the plugin builds both from the source and the prompt.",
            parameter="decoder_prompt",
        )
    if not (prompt["encoder_prompt"].get("multi_modal_data") or {}).get(MODALITY):
        raise VLLMValidationError(MISSING_SOURCE, parameter=MODALITY)


def refuse_requests_without_source() -> None:
    """Makes vLLM's renderer refuse LayAlign requests without a source (idempotent; other models are unaffected).

    vLLM calls the multimodal processor only for requests that carry multimodal data, and runs the others (the
    `/v1/completions` and `/v1/chat/completions` endpoints, `LLM.generate("text")`) through the decoder alone: for
    LayAlign that is the plain LLM without the source, which answers without error. vLLM 0.32 has no per-model hook
    for this check, so it wraps the renderer's encoder-decoder step (`vllm.renderers.base.BaseRenderer.
    _process_enc_dec` and its async twin), through which every encoder-decoder request passes.
    """
    from vllm.renderers.base import BaseRenderer

    if getattr(BaseRenderer, "_layalign_checks_source", False):
        return
    process, process_async = BaseRenderer._process_enc_dec, BaseRenderer._process_enc_dec_async

    def _process_enc_dec(self, prompt, **kwargs):
        _check_layalign_prompt(self.model_config, prompt)
        return process(self, prompt, **kwargs)

    async def _process_enc_dec_async(self, prompt, **kwargs):
        _check_layalign_prompt(self.model_config, prompt)
        return await process_async(self, prompt, **kwargs)

    BaseRenderer._process_enc_dec = _process_enc_dec
    BaseRenderer._process_enc_dec_async = _process_enc_dec_async
    BaseRenderer._layalign_checks_source = True
    logger.debug("LayAlign: requests without a source are refused.")
