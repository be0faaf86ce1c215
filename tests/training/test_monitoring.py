"""The collapse monitor: its statistics, its one-time warning, and its place in the Trainer's logs."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, TrainerControl, TrainerState, TrainingArguments

from modeling_layalign.training.monitoring import PROBE_SOURCES, MappingCollapseCallback, mapping_statistics


@pytest.fixture
def model_and_processor(tiny_layalign_folder):
    model = AutoModelForCausalLM.from_pretrained(tiny_layalign_folder)
    with torch.no_grad():
        for parameter in model.input_mapping.parameters():
            parameter.normal_(std=0.3, generator=torch.Generator().manual_seed(0))
    return model, AutoProcessor.from_pretrained(tiny_layalign_folder)


def collapse(model) -> None:
    """Every source maps to one large vector: the mapping ignores its input."""
    with torch.no_grad():
        model.input_mapping.down.weight.zero_()
        model.input_mapping.down.bias.fill_(5.0)


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "has collapsed" in record.getMessage()]


def test_statistics_tell_a_healthy_mapping_from_a_collapsed_one(model_and_processor):
    model, processor = model_and_processor
    healthy = mapping_statistics(model, processor)
    assert healthy["source_cosine"] < 0.95
    assert healthy["gate_max_abs"] == pytest.approx(0.5)
    collapse(model)
    collapsed = mapping_statistics(model, processor)
    assert collapsed["source_cosine"] == pytest.approx(1.0, abs=1e-5)
    embedding_norm = model.get_input_embeddings().weight.norm(dim=-1).mean()
    expected_ratio = 5.0 * model.config.text_config.hidden_size**0.5 / embedding_norm
    assert collapsed["norm_ratio"] == pytest.approx(expected_ratio.item(), rel=1e-4)


def test_statistics_leave_the_training_mode_as_it_was(model_and_processor):
    model, processor = model_and_processor
    model.train()
    mapping_statistics(model, processor)
    assert model.training and model.llm.training


def test_callback_warns_once_on_a_collapsed_mapping_and_stays_quiet_on_a_healthy_one(model_and_processor, caplog):
    model, processor = model_and_processor
    callback = MappingCollapseCallback(processor)
    with caplog.at_level(logging.WARNING, logger="modeling_layalign.training.monitoring"):
        callback.measure(model, processor)
        assert warnings_of(caplog) == []
        collapse(model)
        callback.measure(model, processor)
        callback.measure(model, processor)
    assert len(warnings_of(caplog)) == 1


def test_callback_adds_its_statistics_to_the_logged_step(model_and_processor, tmp_path):
    model, processor = model_and_processor
    callback = MappingCollapseCallback()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state, control = TrainerState(), TrainerControl(should_log=True)
    callback.on_step_end(args, state, control, model=model, processing_class=processor)
    logs = {"loss": 1.0}
    state.log_history.append(dict(logs))
    callback.on_log(args, state, control, logs=logs)
    assert 0 < logs["layalign/source_cosine"] < 0.95 and state.log_history[-1] == logs
    # Steps that do not log measure nothing.
    control.should_log = False
    callback.on_step_end(args, state, control, model=model, processing_class=processor)
    later = {"loss": 0.5}
    callback.on_log(args, state, control, logs=later)
    assert later == {"loss": 0.5}


def test_probe_set_needs_two_sources(model_and_processor):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match="at least two"):
        mapping_statistics(model, processor, PROBE_SOURCES[:1])
