"""Raw text in, answers out: a text-generation pipeline for LayAlign checkpoints.

`save_pretrained` registers this class in the checkpoint's `config.json` (`custom_pipelines`) and copies this file
with the model's code, so that on any machine

    pipeline("text-generation", model=folder_or_repo, trust_remote_code=True)("Bata wa Janet hutaga mayai 16 ...")

returns `[{"generated_text": answer}]`. The input is the source text (a question in any language the encoder reads);
the checkpoint's `LayAlignProcessor` puts it through its prompt template (the paper's math prompt for a stage-2
model; no prompt for a stage-1 model, which then reconstructs the English sentence). Generation keyword arguments
(`max_new_tokens`, `num_beams`, `do_sample`, ...) pass through to `generate`; `batch_size` batches several inputs.
`return_full_text=True` puts the text prompt in front of each answer, as the stock text-generation pipeline does; it
defaults to `False` here, since the LLM's text prompt is the processor's template rather than the input itself.
"""

from transformers import GenerationConfig, Pipeline


PIPELINE_TASK = "text-generation"


def custom_pipelines_entry() -> dict:
    """The `config.custom_pipelines` value that makes `pipeline(PIPELINE_TASK, trust_remote_code=True)` use this file."""
    return {
        PIPELINE_TASK: {
            "impl": f"{__name__.rsplit('.', 1)[-1]}.{LayAlignTextGenerationPipeline.__name__}",
            "pt": ["AutoModelForCausalLM"],
            "type": "text",
        }
    }


class LayAlignTextGenerationPipeline(Pipeline):
    """Generates the LLM's answer to source texts; each input gives `[{"generated_text": str}]`.

    Preprocessing keeps the text as it is: the processor tokenises a whole batch at once in `_forward`, because the
    two sides pad differently (the encoder on the right, the prompt on the left), which the stock collation cannot do.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def __call__(self, inputs, **kwargs):
        """`inputs`: a source text or a list of them; an empty list gives an empty list."""
        if isinstance(inputs, list) and not inputs:
            return []
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, return_full_text: bool | None = None, **generate_kwargs):
        postprocess_params = {} if return_full_text is None else {"return_full_text": return_full_text}
        return {}, generate_kwargs, postprocess_params

    def preprocess(self, source: str) -> dict:
        if not isinstance(source, str):
            raise ValueError(f"The LayAlign pipeline reads source texts (str), got {type(source).__name__}.")
        return {"source": source}

    def _forward(self, model_inputs: dict, **generate_kwargs) -> dict:
        sources = model_inputs["source"]
        sources = [sources] if isinstance(sources, str) else list(sources)
        batch = self.processor(sources).to(self.model.device)
        if batch["input_ids"].shape[1] == 0:  # no prompt: generate right after the boundary
            batch.pop("input_ids"), batch.pop("attention_mask")
        pad_token_id = self.processor.tokenizer.pad_token_id
        overrides = {} if pad_token_id is None else {"pad_token_id": pad_token_id}
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs, **overrides)
        generated = self.model.generate(**batch, **generate_kwargs)
        new_tokens = generated[:, batch["input_ids"].shape[1] :] if "input_ids" in batch else generated
        texts = [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        # `generate` returns each source's `num_return_sequences` rows one after another; one list per source keeps
        # them together when the pipeline splits a batch back into its inputs.
        per_source = len(texts) // len(sources)
        template = self.processor.prompt_template
        return {
            "generated_text": [texts[start : start + per_source] for start in range(0, len(texts), per_source)],
            "prompt_text": [template.format(query=source) if template else source for source in sources],
        }

    def postprocess(self, model_outputs: dict, return_full_text: bool = False) -> list[dict[str, str]]:
        """One input's texts (a list, or a list holding that list when the input was not batched); with
        `return_full_text`, each after the text prompt the LLM read (the source itself when there is no template)."""
        texts, prompt = model_outputs["generated_text"], model_outputs["prompt_text"]
        if texts and isinstance(texts[0], list):
            (texts,) = texts
            (prompt,) = prompt
        return [{"generated_text": f"{prompt} {text}" if return_full_text else text} for text in texts]
