"""Train LayAlign with the standard `Trainer`: stage 1 (alignment) or stage 2 (task).

    python examples/train_layalign.py --preset demo --stage 1 --output_dir outputs/demo/stage1
    python examples/train_layalign.py --preset demo --stage 2 --init_from outputs/demo/stage1 \\
        --output_dir outputs/demo/stage2
    accelerate launch --config_file configuration/accelerate/multi_gpu_ddp.yaml examples/train_layalign.py \\
        --preset paper-math --stage 1

A `--preset` (a file in `configuration/presets/`) fills in defaults for the model, the data and the stage's
`TrainingArguments`; any flag given on the command line overrides it. Every `TrainingArguments` flag works
(`--resume_from_checkpoint`, `--gradient_checkpointing`, `--bf16`, `--report_to`, ...).
"""

import argparse
import copy
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.utils import logging

from modeling_layalign import LayAlignForCausalLM, LayAlignProcessor
from modeling_layalign.bases_layalign import check_training_checkpoint
from modeling_layalign.saving_layalign import LORA_SUBFOLDER
from modeling_layalign.training.data import (
    MATH_PROMPT,
    PAIR_LANGUAGES,
    LayAlignDataCollator,
    held_out_lines,
    load_english_sentences,
    load_training_file,
    load_math_instructions,
    load_translation_pairs,
    tokenize_for_stage,
)
from modeling_layalign.training.distributed_exit import exit_without_finalization
from modeling_layalign.training.engine_checkpoints import check_engine_saves_weights, check_resume_fits_engine
from modeling_layalign.training.monitoring import MappingCollapseCallback
from modeling_layalign.training.warm_start import warm_start_input_mapping


REPOSITORY = Path(__file__).resolve().parent.parent
LORA_BASE_SUBFOLDER = "lora_base"  # the model a LoRA run's Trainer checkpoints (peft adapters) go over


logger = logging.get_logger("train_layalign")


def _bitsandbytes(**options):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**options)


def _quanto(weights: str):
    from transformers import QuantoConfig

    return QuantoConfig(weights=weights)


def _torchao_int8():
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


# `--quantize` methods -> their transformers config, given the dtype the model computes in. `nf4` is QLoRA's
# (bitsandbytes 4-bit NormalFloat with double quantization); bitsandbytes' 4-bit needs a GPU in practice (see docs).
QUANTIZATION_METHODS = {
    "nf4": lambda dtype: _bitsandbytes(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    ),
    "int8": lambda dtype: _bitsandbytes(load_in_8bit=True),
    "quanto-int8": lambda dtype: _quanto("int8"),
    "quanto-int4": lambda dtype: _quanto("int4"),
    "torchao-int8": lambda dtype: _torchao_int8(),
}
PRESET_DIR = REPOSITORY / "configuration" / "presets"


@dataclass
class ModelArguments:
    encoder: str | None = field(default=None, metadata={"help": "Hub id or folder of the multilingual encoder."})
    llm: str | None = field(default=None, metadata={"help": "Hub id or folder of the English-centric LLM."})
    demo_models: bool = field(
        default=False, metadata={"help": "Use the offline demo pair (multilingual-e5-small + SmolLM2-135M-Instruct)."}
    )
    init_from: str | None = field(
        default=None, metadata={"help": "A LayAlign checkpoint to start from (stage 2 starts from stage 1's output)."}
    )
    dtype: str = field(default="float32", metadata={"help": "dtype of the loaded models: float32, bfloat16, float16."})
    fused_encoder_layers: list[int] | None = field(default=None, metadata={"help": "Encoder hidden states to fuse."})
    mapped_encoder_layer: int | None = field(
        default=None, metadata={"help": "Encoder hidden state the input mapping reads; default the final output."}
    )
    adapted_llm_layers: list[int] | None = field(default=None, metadata={"help": "LLM layers that get fused attention."})
    fusion_structure: str = field(default="linear", metadata={"help": "linear or mlp."})
    use_layer_fusion: bool = field(default=True, metadata={"help": "False gives MindMerger."})
    use_input_mapping: bool = field(default=True)
    train_llm: bool = field(default=False, metadata={"help": "Fine-tune the whole LLM (saves full checkpoints)."})
    encoder_dropout_in_training: bool = field(default=True, metadata={"help": "Keep the frozen encoder's dropout on."})
    quantize: str | None = field(
        default=None,
        metadata={
            "help": f"Load the LLM quantized (the encoder stays as it is): one of {sorted(QUANTIZATION_METHODS)}. "
            "Recorded in the checkpoint, so `--init_from` and `from_pretrained` load it quantized again."
        },
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the LLM; 0 trains no LoRA."})
    lora_alpha: int = field(default=16)
    merge_lora: bool = field(
        default=True,
        metadata={
            "help": "False keeps a full-precision LLM's LoRA as an adapter in the output's `lora/` folder, next to the "
            "LayAlign-only weights (megabytes instead of the LLM), as a quantized LLM's LoRA always is."
        },
    )
    lora_target: str = field(
        default=r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
        metadata={"help": "Regular expression over module names that LoRA adapts."},
    )
    encoder_text_prefix: str = field(default="", metadata={"help": "Text put before every source (e5: 'query: ')."})
    warm_start_sentences: int = field(
        default=0,
        metadata={
            "help": "Stage 1 from scratch: first fit the input mapping on up to this many English training sentences "
            "(modeling_layalign.training.warm_start; not in the paper). 0 starts from random weights, as the paper does."
        },
    )
    warm_start_pairs: int = field(
        default=0,
        metadata={"help": "With --warm_start_sentences: also fit on the source side of this many training pairs."},
    )


@dataclass
class DataArguments:
    stage: int = field(default=1, metadata={"help": "1: alignment on translation pairs; 2: the task."})
    languages: list[str] = field(default_factory=lambda: list(PAIR_LANGUAGES))
    data_dir: str | None = field(default=None, metadata={"help": "Folder in the shipped layout (default: data/)."})
    train_file: str | None = field(
        default=None, metadata={"help": "JSONL with `source`, `target` and optionally `prompt`, instead of the shipped data."}
    )
    held_out: int = field(default=50, metadata={"help": "Last question lines kept out of training (for evaluation)."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_source_length: int = field(default=200)
    max_length: int = field(default=512)
    prompt_template: str = field(default=MATH_PROMPT, metadata={"help": "Stage-2 prompt with a {query} field."})


def preset_arguments(argv: list[str]) -> list[str]:
    """Command-line arguments of the preset named by `--preset`, for the stage named by `--stage`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--preset")
    parser.add_argument("--stage", type=int, default=1)
    known, _ = parser.parse_known_args(argv)
    if known.preset is None:
        return []
    path = Path(known.preset) if known.preset.endswith(".json") else PRESET_DIR / f"{known.preset}.json"
    if not path.is_file():
        available = sorted(file.stem for file in PRESET_DIR.glob("*.json"))
        raise SystemExit(f"Unknown preset {known.preset!r}; available: {available}")
    preset = json.loads(path.read_text())
    values = {**preset.get("model", {}), **preset.get("data", {}), **preset.get(f"stage{known.stage}", {})}
    arguments = []
    for key, value in values.items():
        arguments += [f"--{key}", *(str(item) for item in (value if isinstance(value, list) else [value]))]
    return arguments


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Preset values first, then the command line, so that a flag overrides the preset."""
    cleaned = list(argv)
    if "--preset" in cleaned:
        index = cleaned.index("--preset")
        del cleaned[index : index + 2]
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=preset_arguments(argv) + cleaned)


def quantization_config(method: str | None, dtype: torch.dtype):
    """The transformers quantization config of a `--quantize` method (None: no quantization)."""
    if method is None:
        return None
    if method not in QUANTIZATION_METHODS:
        raise SystemExit(f"Unknown `--quantize` {method!r}; pass one of {sorted(QUANTIZATION_METHODS)}.")
    try:
        return QUANTIZATION_METHODS[method](dtype)
    except ImportError as error:
        raise SystemExit(f"`--quantize {method}` needs {error.name}: `pip install {error.name}`.") from error


# Flags that decide the architecture: `--init_from` keeps its checkpoint's, so one that asks for another is refused.
ARCHITECTURE_FLAGS = (
    "fused_encoder_layers", "mapped_encoder_layer", "adapted_llm_layers", "fusion_structure", "use_layer_fusion",
    "use_input_mapping",
)  # fmt: skip


def apply_flags_to_checkpoint(model: LayAlignForCausalLM, model_args: ModelArguments) -> None:
    """The model flags that still mean something for a model loaded by `--init_from`: `--train_llm True` makes the
    LLM train from here on (and the checkpoints hold it in full); an architecture flag must agree with the
    checkpoint (both were silently ignored before)."""
    defaults = {flag.name: flag.default for flag in dataclasses.fields(ModelArguments)}
    for name in ARCHITECTURE_FLAGS:
        asked, built = getattr(model_args, name), getattr(model.config, name)
        if asked != defaults[name] and asked != built:
            raise SystemExit(
                f"`--{name} {asked}` asks for another architecture than the checkpoint of `--init_from` "
                f"{model_args.init_from} has ({name} = {built}): a checkpoint keeps its architecture; drop the flag, "
                "or start from the bases (`--encoder`, `--llm`)."
            )
    if model_args.train_llm and not model.config.train_llm:
        model.config.train_llm = True
        model.apply_trainable_parts()


def build_model(model_args: ModelArguments, data_args: DataArguments) -> tuple[LayAlignForCausalLM, LayAlignProcessor]:
    dtype = getattr(torch, model_args.dtype)
    quantization = quantization_config(model_args.quantize, dtype)
    # A checkpoint trained over a quantized LLM loads it quantized again; `--quantize` replaces that.
    quantized = {"quantization_config": quantization} if quantization is not None else {}
    if model_args.init_from:
        # A LoRA kept in the checkpoint is attached by `add_lora`, through peft, to go on training it.
        model = LayAlignForCausalLM.from_pretrained(model_args.init_from, dtype=dtype, load_lora=False, **quantized)
        if kept_lora(model_args.init_from) is not None and not model_args.lora_r:
            raise SystemExit(
                f"`--init_from` {model_args.init_from} carries a LoRA kept as an adapter (its `{LORA_SUBFOLDER}/` "
                "folder, from a LoRA run over a quantized LLM or with `--merge_lora False`): pass `--lora_r` to go on "
                "training it (it keeps its own rank), or start from the checkpoint that run started from."
            )
        apply_flags_to_checkpoint(model, model_args)
        processor = LayAlignProcessor.from_pretrained(model_args.init_from)
        processor.prompt_template = data_args.prompt_template
        processor.max_source_length = data_args.max_source_length
        processor.max_length = data_args.max_length
        return model, processor
    encoder, llm = model_args.encoder, model_args.llm
    if model_args.demo_models:
        from layalign_demo import ENCODER_TEXT_PREFIX, prepare_demo_models

        encoder, llm = (str(path) for path in prepare_demo_models())
        model_args.encoder_text_prefix = model_args.encoder_text_prefix or ENCODER_TEXT_PREFIX
    if encoder is None or llm is None:
        raise SystemExit("Give `--encoder` and `--llm` (or `--demo_models`, `--init_from`, or a `--preset`).")
    config_fields = {
        name: getattr(model_args, name)
        for name in ("fusion_structure", "use_layer_fusion", "use_input_mapping", "train_llm", "encoder_dropout_in_training")
    }
    for name in ("fused_encoder_layers", "mapped_encoder_layer", "adapted_llm_layers"):
        if getattr(model_args, name) is not None:
            config_fields[name] = getattr(model_args, name)
    model = LayAlignForCausalLM.from_base_models(
        encoder,
        llm,
        encoder_kwargs={"dtype": dtype},
        llm_kwargs={"dtype": dtype, **quantized},
        **config_fields,
    )
    tokenizer = AutoTokenizer.from_pretrained(llm)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    processor = LayAlignProcessor(
        tokenizer=tokenizer,
        encoder_tokenizer=AutoTokenizer.from_pretrained(encoder),
        encoder_text_prefix=model_args.encoder_text_prefix,
        prompt_template=data_args.prompt_template,
        max_source_length=data_args.max_source_length,
        max_length=data_args.max_length,
    )
    return model, processor


def kept_lora(checkpoint: str | None) -> Path | None:
    """The folder of the LoRA that a checkpoint keeps as an adapter (see `save_lora_run`), if it has one."""
    folder = Path(checkpoint) / LORA_SUBFOLDER if checkpoint else None
    return folder if folder is not None and (folder / "adapter_config.json").is_file() else None


def add_lora(model: LayAlignForCausalLM, model_args: ModelArguments, base: str | None):
    """Stock peft LoRA on the LLM's attention; the LayAlign modules stay trainable through `modules_to_save`. A LoRA
    that `--init_from` keeps goes on training instead (with its own configuration). `base` (see [`lora_base`]) is
    what the adapters' `base_model_name_or_path` names."""
    from peft import LoraConfig, get_peft_model

    if (adapter := kept_lora(model_args.init_from)) is not None:
        model = train_kept_lora(model, adapter)
    else:
        config = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            target_modules=model_args.lora_target,
            modules_to_save=list(model.layalign_module_names),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    model.peft_config[model.active_adapter].base_model_name_or_path = base
    return model


def train_kept_lora(model: LayAlignForCausalLM, adapter: Path):
    """The LoRA a checkpoint keeps, attached to train on, with the LayAlign modules trainable as `modules_to_save`,
    as in the run that saved it.

    A kept LoRA is saved without peft's copies of the LayAlign modules (see [`lora_alone`]); peft loads
    `modules_to_save` only from the adapter's own file, so their copies are given the checkpoint's LayAlign weights
    here. (Kept LoRAs saved before 2026-12-07 hold the same copies, which then load as they are.)
    """
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    config = PeftConfig.from_pretrained(adapter)
    config.inference_mode = False
    config.modules_to_save = list(model.layalign_module_names)
    own_copies = {
        peft_copy_prefix(name) + key: value
        for name in model.layalign_module_names
        if (module := getattr(model, name)) is not None
        for key, value in module.state_dict().items()
    }
    model = get_peft_model(model, config)
    set_peft_model_state_dict(model, {**own_copies, **load_file(adapter / SAFETENSORS_WEIGHTS_NAME)})
    return model


def peft_copy_prefix(name: str) -> str:
    """The key prefix of peft's copy (`modules_to_save`) of the LayAlign module `name` in an adapter's weights file."""
    return f"base_model.model.{name}."


def lora_base(
    model: LayAlignForCausalLM, processor: LayAlignProcessor, model_args: ModelArguments, training_args: TrainingArguments
) -> str | None:
    """The model a LoRA run's adapters go over, so that its Trainer checkpoints load as peft loads any adapter.

    Each `checkpoint-N` of a LoRA run is a peft adapter (the LoRA and the trained LayAlign modules), and peft's
    `AutoPeftModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)` loads it over the model its
    `base_model_name_or_path` names. That is the `--init_from` checkpoint; a run from the bases, or one that goes on
    training the LoRA its `--init_from` keeps (a base without that LoRA), first saves the model as it starts to
    `<output_dir>/lora_base` (LayAlign-only: a few MB). Local folders are named by absolute path, so a checkpoint
    loads from any working directory. `None` where no checkpoint is saved, and under ZeRO-3 (its bases are
    partitioned before the Trainer could gather them; load a checkpoint there with `PeftModel.from_pretrained` over
    the model built as the run built it).
    """
    from accelerate import PartialState
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.trainer_utils import SaveStrategy

    if training_args.save_strategy == SaveStrategy.NO:
        return None
    if model_args.init_from and kept_lora(model_args.init_from) is None:
        local = Path(model_args.init_from)
        return str(local.resolve()) if local.is_dir() else model_args.init_from
    if is_deepspeed_zero3_enabled():
        return None
    folder = Path(training_args.output_dir).resolve() / LORA_BASE_SUBFOLDER
    if PartialState().is_main_process:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return str(folder)


def training_data(data_args: DataArguments):
    if data_args.train_file:
        dataset = load_training_file(data_args.train_file)
    elif data_args.stage == 1:
        exclude = held_out_lines(data_args.held_out)
        dataset = load_translation_pairs(data_args.languages, exclude_lines=exclude, data_dir=data_args.data_dir)
    else:
        exclude = held_out_lines(data_args.held_out)
        dataset = load_math_instructions(data_args.languages, exclude_lines=exclude, data_dir=data_args.data_dir)
    dataset = dataset.shuffle(seed=0)
    if data_args.max_train_examples is not None:
        dataset = dataset.select(range(min(data_args.max_train_examples, len(dataset))))
    return dataset


def keep_trainable_in_float32(model: LayAlignForCausalLM, training_args: TrainingArguments) -> None:
    """With half-precision bases, train the LayAlign modules in float32 under autocast (as mixed precision does)."""
    if not (training_args.bf16 or training_args.fp16):
        raise SystemExit("Half-precision bases (`--dtype bfloat16/float16`) need autocast: add `--bf16` or `--fp16`.")
    for name in model.layalign_module_names:
        if (module := getattr(model, name)) is not None:
            module.float()


def warm_start(model: LayAlignForCausalLM, processor: LayAlignProcessor, model_args: ModelArguments, data_args) -> None:
    """Fits the input mapping before a stage-1 run from scratch (see `modeling_layalign/training/warm_start.py`).

    The English sentences and the pairs come from the training split (no held-out line), whatever
    `--max_train_examples` keeps for the stage itself.
    """
    if not model_args.warm_start_sentences or model_args.init_from or data_args.stage != 1:
        return
    sentences = load_english_sentences(exclude_lines=held_out_lines(data_args.held_out), data_dir=data_args.data_dir)
    translation_pairs = None
    if model_args.warm_start_pairs:
        pairs = training_data(dataclasses.replace(data_args, max_train_examples=model_args.warm_start_pairs))
        translation_pairs = (pairs["source"], pairs["target"])
    result = warm_start_input_mapping(model, processor, sentences[: model_args.warm_start_sentences], translation_pairs)
    logger.info(f"Input mapping warm-started: {result}")


def main(argv: list[str] | None = None, callbacks: list | None = None) -> Trainer:
    """Runs one stage; `callbacks` join the Trainer's (the collapse monitor is always on with input mapping)."""
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    # Seeded before the LayAlign modules are initialised, so `--seed` fixes the whole run (Trainer seeds only later).
    set_seed(training_args.seed)
    model, processor = build_model(model_args, data_args)
    if training_args.resume_from_checkpoint:
        check_training_checkpoint(model, training_args.resume_from_checkpoint)
    warm_start(model, processor, model_args, data_args)
    if model_args.dtype != "float32":
        keep_trainable_in_float32(model, training_args)
    if model_args.lora_r:
        model = add_lora(model, model_args, lora_base(model, processor, model_args, training_args))
    dataset = tokenize_for_stage(training_data(data_args), processor, data_args.stage)
    logger.info(f"Stage {data_args.stage}: {len(dataset)} training examples.")
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=LayAlignDataCollator(processor),
        processing_class=processor,
        callbacks=[*([MappingCollapseCallback(processor)] if model.config.use_input_mapping else []), *(callbacks or [])],
    )
    check_engine_saves_weights(trainer)
    if training_args.resume_from_checkpoint:
        check_resume_fits_engine(trainer, training_args.resume_from_checkpoint)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if model_args.lora_r:
        save_lora_run(trainer.model, processor, training_args.output_dir, merge=model_args.merge_lora)
    trainer.save_state()
    return trainer


def merge_lora(model) -> LayAlignForCausalLM:
    """peft's `merge_and_unload` of a LoRA run: the adapters merged into the bases they adapt, the trained LayAlign
    modules in place. A base a LoRA adapted now differs from the source its config names: it is recorded as modified,
    so that this model and every model trained from it later save every weight."""
    adapted_bases = sorted({name.split(".", 1)[0] for name in model.base_model.targeted_module_names})
    merged = model.merge_and_unload()
    for base in adapted_bases:
        merged.mark_base_modified(base, "a LoRA was merged into it")
    return merged


def save_lora_run(model, processor: LayAlignProcessor, output_dir: str, merge: bool = True) -> None:
    """Replaces the peft adapter that `Trainer` saved with a LayAlign checkpoint that `--init_from`,
    `evaluate_layalign.py` and `from_pretrained` load like any other.

    Over a full-precision LLM the adapters are merged ([`merge_lora`]) unless `merge=False`: a full checkpoint. Kept
    (`merge=False`, and always over a quantized LLM, as QLoRA users expect: merging would round the update away in the
    quantized weights) they stay an adapter: the trained LayAlign modules in a LayAlign-only checkpoint, the LoRA in
    its `lora/` folder, which `from_pretrained` attaches again.
    """
    if merge and getattr(model.get_base_model(), "quantization_method", None) is None:
        merge_lora(model).save_pretrained(output_dir)
    else:
        from peft.utils import SAFETENSORS_WEIGHTS_NAME

        weights, config = lora_alone(model)
        # The trained copies of the LayAlign modules over the unmerged LLM; the save replaces any older `lora/`.
        model.unload().save_pretrained(output_dir)
        config.save_pretrained(Path(output_dir) / LORA_SUBFOLDER)
        save_file(weights, Path(output_dir) / LORA_SUBFOLDER / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
    processor.save_pretrained(output_dir)  # a model save replaces the processor files it finds


def lora_alone(model) -> tuple[dict[str, torch.Tensor], "PeftConfig"]:
    """A peft model's LoRA weights and config without peft's copies of the LayAlign modules (`modules_to_save`):
    a kept checkpoint holds those once, in its own weights file (the copies are 3.9 MB on the demo models, a third of
    an r 16 adapter with them; 128 MiB for the paper's pair)."""
    from peft import get_peft_model_state_dict

    config = copy.copy(model.peft_config[model.active_adapter])
    config.modules_to_save = None
    copies = tuple(peft_copy_prefix(name) for name in model.get_base_model().layalign_module_names)
    weights = {key: value for key, value in get_peft_model_state_dict(model).items() if not key.startswith(copies)}
    return weights, config


def leave_launched_run(trainer: Trainer) -> None:
    """Ends the process once its run has finished and saved: a process of a launched run (more than one process)
    leaves without the interpreter's finalization, which could abort it over the process groups the engines keep
    alive (see `modeling_layalign.training.distributed_exit`); its exit hooks still run."""
    trainer.accelerator.end_training()
    if trainer.args.world_size > 1:
        exit_without_finalization()


if __name__ == "__main__":
    leave_launched_run(main())
