"""The custom text-generation pipeline, loaded from a saved folder in a process that cannot import this package."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoProcessor

from modeling_layalign.evaluation.scoring import layalign_generate


SOURCES = ["Bata wa Janet hutaga mayai 16 kila siku.", "Weng earns $12 an hour", "Natalia hat 48 Clips verkauft."]
CLEAN_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_layalign"] = None  # as on a machine without this package
    from transformers import pipeline
    pipe = pipeline("text-generation", model=sys.argv[1], trust_remote_code=True)
    sources = json.loads(sys.argv[2])
    one = pipe(sources[0], max_new_tokens=5)
    batched = pipe(sources, batch_size=2, max_new_tokens=5)
    beam_settings = dict(max_new_tokens=5, num_beams=2, num_return_sequences=2)
    beams = [pipe(source, **beam_settings) for source in sources]
    batched_beams = pipe(sources, batch_size=2, **beam_settings)
    full = pipe(sources, batch_size=2, max_new_tokens=5, return_full_text=True)
    full_one = pipe(sources[0], max_new_tokens=5, return_full_text=True)
    print(json.dumps({"class": type(pipe).__name__, "one": one, "batched": batched, "beams": beams,
                      "batched_beams": batched_beams, "full": full, "full_one": full_one, "empty": pipe([])}))
    """
)


def test_pipeline_answers_raw_text_in_a_clean_process(tiny_layalign_folder, tmp_path):
    saved = json.loads((Path(tiny_layalign_folder) / "config.json").read_text())
    assert saved["custom_pipelines"]["text-generation"]["impl"] == "pipeline_layalign.LayAlignTextGenerationPipeline"
    result = subprocess.run(
        [sys.executable, "-c", CLEAN_PROCESS, tiny_layalign_folder, json.dumps(SOURCES)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["class"] == "LayAlignTextGenerationPipeline"
    # The same answers as the package's own greedy generation with the processor's prompt template.
    model = AutoModelForCausalLM.from_pretrained(tiny_layalign_folder)
    processor = AutoProcessor.from_pretrained(tiny_layalign_folder)
    prompts = [processor.prompt_template.format(query=source) for source in SOURCES]
    expected = layalign_generate(model, processor, SOURCES, prompts, max_new_tokens=5)
    assert output["one"] == [{"generated_text": expected[0]}]
    assert output["batched"] == [[{"generated_text": text}] for text in expected]
    for beams in output["beams"]:
        assert len(beams) == 2 and all(isinstance(item["generated_text"], str) for item in beams)
    # Several sequences per source stay with their source when sources are batched.
    assert output["batched_beams"] == output["beams"]
    # `return_full_text` as the stock pipeline has it: the text prompt, then the answer; no input, no output.
    assert output["full"] == [[{"generated_text": f"{prompt} {text}"}] for prompt, text in zip(prompts, expected)]
    assert output["full_one"] == output["full"][0]
    assert output["empty"] == []
