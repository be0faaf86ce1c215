"""`POST /v1/layalign/generate` on vLLM's OpenAI-compatible server: a LayAlign request with its source text.

vLLM's `/v1/completions` has no field for multimodal data and `/v1/chat/completions` accepts only its fixed content
part types, so neither can carry the source; this endpoint plugin (entry point group `vllm.endpoint_plugins`, loaded
only when `VLLM_PLUGINS` names it: `VLLM_PLUGINS=layalign`) adds a route that can. A request is either

    {"question": "..."}                      the question is the source and, through the checkpoint's prompt
                                             template (processor_config.json), the prompt, as LayAlignProcessor does;
    {"source": "..." | [ids], "prompt": "..." | [ids]}    an explicit source text (or encoder ids) and LLM prompt;

plus sampling fields (`max_tokens`, `min_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `ignore_eos`). The answer is
`{"text", "token_ids", "finish_reason"}`. A bad request gets HTTP 400 (422 for a malformed body) whose `message`
says what to pass.
"""

import uuid
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.logger import init_logger

from .processing import MODALITY, ProcessorSettings


logger = init_logger(__name__)

ROUTE = "/v1/layalign/generate"


class LayAlignGenerateRequest(BaseModel):
    """The body of `POST /v1/layalign/generate`."""

    model_config = ConfigDict(extra="forbid")

    question: str | None = Field(None, description="Source text that is also the prompt, through the template.")
    source: str | list[int] | None = Field(None, description="Source text (or encoder token ids).")
    prompt: str | list[int] | None = Field(None, description="LLM prompt (text, or LLM token ids without BOS).")
    max_tokens: int = Field(16, ge=1)
    min_tokens: int = Field(0, ge=0)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    seed: int | None = None
    ignore_eos: bool = False


def _error(message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": status.phrase, "code": status.value}}, status_code=status.value
    )


class LayAlignEndpoint:
    """The endpoint plugin (`vllm.plugins.endpoint_plugins.interface.EndpointPlugin`)."""

    name = "layalign"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        @app.post(ROUTE)
        async def layalign_generate(body: LayAlignGenerateRequest, raw_request: Request):
            state = raw_request.app.state
            if body.question is not None and (body.source is not None or body.prompt is not None):
                return _error("Pass either `question` (source and prompt at once) or `source` with `prompt`, not both.")
            if body.question is None and body.source is None:
                return _error(
                    "LayAlign needs the source text: pass `question` (the source, also made the prompt through the "
                    "checkpoint's template) or `source` (text or encoder token ids) with `prompt`."
                )
            if body.question is not None:
                source, prompt = body.question, state.layalign_settings.prompt_for_question(body.question)
            else:
                source, prompt = body.source, "" if body.prompt is None else body.prompt
            engine_prompt = {"multi_modal_data": {MODALITY: source}}
            engine_prompt["prompt" if isinstance(prompt, str) else "prompt_token_ids"] = prompt
            params = SamplingParams(
                max_tokens=body.max_tokens,
                min_tokens=body.min_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=body.seed,
                ignore_eos=body.ignore_eos,
            )
            final = None
            try:
                async for output in state.layalign_engine.generate(engine_prompt, params, f"layalign-{uuid.uuid4()}"):
                    final = output
            except (VLLMClientError, ValueError) as error:
                return _error(str(error))
            completion = final.outputs[0]
            return {
                "text": completion.text,
                "token_ids": list(completion.token_ids),
                "finish_reason": completion.finish_reason,
            }

    async def init_state(self, engine_client, state, args) -> None:
        state.layalign_engine = engine_client
        state.layalign_settings = ProcessorSettings.from_folder(engine_client.model_config.model)
        logger.info("LayAlign: POST %s is served.", ROUTE)
