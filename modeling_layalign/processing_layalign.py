"""The LayAlign processor: the encoder's tokenizer and the LLM's tokenizer, saved and loaded as one."""

import inspect
import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin


IGNORE_INDEX = -100
# A folder holds the LLM's tokenizer when it holds one of these (what `save_pretrained` writes for fast and slow ones).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


class LayAlignProcessor(ProcessorMixin):
    r"""
    Builds LayAlign inputs from text: the source text for the encoder, and for the LLM an optional prompt followed
    by an optional target.

    - Stage 1 (alignment): `processor(sources, targets=english)`: no prompt; the loss covers the English side.
    - Stage 2 (task): `processor(sources, targets=answers, prompts=prompts)`: the loss covers the answer only.
    - Inference: `processor(sources, prompts=prompts)`: left-padded for `generate`.

    The LLM text carries no BOS (the model puts `[BOS, mapped encoder tokens, boundary]` in front itself); a target
    ends with the LLM's EOS so that the model learns to stop.

    Args:
        tokenizer: the LLM's tokenizer (saved at the top of the folder, like any causal LM's).
        encoder_tokenizer: the encoder's tokenizer (saved in the `encoder_tokenizer/` subfolder).
        encoder_text_prefix (`str`, *optional*, defaults to `""`): put in front of every source text, for encoders
            trained with one (e5's `"query: "`).
        prompt_template (`str`, *optional*): a template with a `{query}` field; when set and no `prompts` are given,
            the prompt is the template filled with the source text (the paper's math prompt for stage 2).
        max_source_length (`int`, *optional*, defaults to 200): longest encoder input, in encoder tokens.
        max_length (`int`, *optional*, defaults to 512): longest LLM text (prompt and target), in LLM tokens; the
            target's end is cut first, then the prompt's start.
    """

    def __init__(
        self,
        tokenizer=None,
        encoder_tokenizer=None,
        encoder_text_prefix: str = "",
        prompt_template: str | None = None,
        max_source_length: int = 200,
        max_length: int = 512,
        **kwargs,
    ):
        super().__init__(tokenizer, encoder_tokenizer, **kwargs)
        if prompt_template is not None and "{query}" not in prompt_template:
            raise ValueError(f"`prompt_template` must contain a `{{query}}` field, got {prompt_template!r}.")
        for name, value in (("max_source_length", max_source_length), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        self.encoder_text_prefix = encoder_text_prefix
        self.prompt_template = prompt_template
        self.max_source_length = max_source_length
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *args,
        encoder_name_or_path: str | None = None,
        llm_name_or_path: str | None = None,
        **kwargs,
    ) -> "LayAlignProcessor":
        """`ProcessorMixin.from_pretrained`; a local LayAlign checkpoint saved without tokenizer files (a small
        LayAlign-only checkpoint, such as the shipped ones) takes them from its bases.

        Args:
            encoder_name_or_path / llm_name_or_path: where the bases' tokenizers are, when the checkpoint has none;
                default to the names in its `config.json`. The settings (`encoder_text_prefix`, `prompt_template`,
                lengths) come from its `processor_config.json` when it has one; keyword arguments override them.
        """
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_FILES):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        config = _read_json(folder / "config.json")
        sources = {
            "encoder_name_or_path": encoder_name_or_path or config.get("encoder_name_or_path"),
            "llm_name_or_path": llm_name_or_path or config.get("llm_name_or_path"),
        }
        if missing := [name for name, source in sources.items() if not source]:
            raise ValueError(
                f"{folder} holds no tokenizer files and its config names no base to take them from: pass "
                f"{' and '.join(f'`{name}=`' for name in missing)} (the folders or Hub ids of the bases)."
            )
        settings = set(inspect.signature(cls.__init__).parameters) - {"self", "tokenizer", "encoder_tokenizer", "kwargs"}
        saved = {name: value for name, value in _read_json(folder / "processor_config.json").items() if name in settings}
        given = {name: kwargs.pop(name) for name in list(kwargs) if name in settings}
        # The rest are loading options (`trust_remote_code`, `revision`, ...), for the tokenizers; `_from_auto` and
        # the like are what `AutoProcessor` tells a processor class about itself.
        loading = {name: value for name, value in kwargs.items() if not name.startswith("_")}
        return cls(
            tokenizer=AutoTokenizer.from_pretrained(sources["llm_name_or_path"], **loading),
            encoder_tokenizer=AutoTokenizer.from_pretrained(sources["encoder_name_or_path"], **loading),
            **{**saved, **given},
        )

    def encode_example(self, source: str, target: str | None = None, prompt: str | None = None) -> dict[str, list[int]]:
        """Token ids of one example, unpadded: `input_ids`, `encoder_input_ids` and, with a target, `labels`.

        Suited to `datasets.Dataset.map`; [`pad`] batches the results.
        """
        if not isinstance(source, str):
            raise ValueError(f"`source` must be a string, got {type(source).__name__}.")
        if prompt is None and self.prompt_template is not None:
            prompt = self.prompt_template.format(query=source)
        encoder_input_ids = self.encoder_tokenizer(
            self.encoder_text_prefix + source, truncation=True, max_length=self.max_source_length
        )["input_ids"]
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        target_ids = []
        if target is not None:
            target_ids = self.tokenizer(target, add_special_tokens=False)["input_ids"] + [self._eos_token_id()]
        overflow = len(prompt_ids) + len(target_ids) - self.max_length
        if overflow > 0:
            cut_target = min(overflow, max(len(target_ids) - 1, 0))
            target_ids = target_ids[: len(target_ids) - cut_target]
            prompt_ids = prompt_ids[overflow - cut_target :]
        example = {"encoder_input_ids": encoder_input_ids, "input_ids": prompt_ids + target_ids}
        if target is not None:
            example["labels"] = [IGNORE_INDEX] * len(prompt_ids) + target_ids
        return example

    def pad(self, examples: list[dict[str, list[int]]], padding_side: str = "right", return_tensors: str = "pt") -> BatchFeature:
        """Pads examples from [`encode_example`] into a batch.

        The encoder side is always right-padded (encoders with absolute positions expect it). The LLM side is padded
        on `padding_side`: right for training batches, left for `generate`. `labels` are padded with -100.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
        if return_tensors != "pt":
            raise ValueError(f"LayAlignProcessor returns PyTorch tensors only (`return_tensors='pt'`), got {return_tensors!r}.")
        encoder_input_ids, encoder_attention_mask = pad_sequences(
            [example["encoder_input_ids"] for example in examples], self._pad_id(self.encoder_tokenizer), "right"
        )
        input_ids, attention_mask = pad_sequences(
            [example["input_ids"] for example in examples], self._pad_id(self.tokenizer), padding_side
        )
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "encoder_input_ids": encoder_input_ids,
            "encoder_attention_mask": encoder_attention_mask,
        }
        if "labels" in examples[0]:
            batch["labels"], _ = pad_sequences([example["labels"] for example in examples], IGNORE_INDEX, padding_side)
        return BatchFeature(batch)

    def __call__(
        self,
        sources: str | list[str],
        targets: str | list[str] | None = None,
        prompts: str | list[str] | None = None,
        padding_side: str | None = None,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """A padded batch for `forward` (with `targets`: right-padded, with `labels`) or `generate` (left-padded)."""
        sources = [sources] if isinstance(sources, str) else list(sources)
        targets = _as_list("targets", targets, len(sources))
        prompts = _as_list("prompts", prompts, len(sources))
        examples = [self.encode_example(*fields) for fields in zip(sources, targets, prompts)]
        if padding_side is None:
            padding_side = "right" if targets[0] is not None else "left"
        return self.pad(examples, padding_side=padding_side, return_tensors=return_tensors)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        """The LLM tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        """The LLM tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)

    def _eos_token_id(self) -> int:
        if self.tokenizer.eos_token_id is None:
            raise ValueError("The LLM tokenizer has no EOS token; a LayAlign target needs one to end on.")
        return self.tokenizer.eos_token_id

    @staticmethod
    def _pad_id(tokenizer) -> int:
        for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
            if candidate is not None:
                return candidate
        return 0


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _as_list(name: str, values, size: int) -> list:
    if values is None:
        return [None] * size
    values = [values] if isinstance(values, str) else list(values)
    if len(values) != size:
        raise ValueError(f"`{name}` holds {len(values)} texts but `sources` holds {size}; give one per source.")
    return values


def pad_sequences(rows: list[list[int]], pad_value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pads token lists to the longest on `side`; returns `(values, attention_mask)` as `(batch, length)` tensors."""
    width = max(len(row) for row in rows)
    values = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        values[index, span] = torch.tensor(row, dtype=torch.long)
        mask[index, span] = 1
    return values, mask


LayAlignProcessor.register_for_auto_class()

__all__ = ["LayAlignProcessor"]
