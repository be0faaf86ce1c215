"""Convert checkpoints of the reference LayAlign and MindMerger code into LayAlign-only checkpoints of this package.

    python -m modeling_layalign.conversion.convert SOURCE OUTPUT_DIR [--encoder google/mt5-xl] [--llm meta-math/MetaMath-7B-V1.0]

SOURCE is a `pytorch_model.bin`, a folder holding one (or a sharded `pytorch_model.bin.index.json`), or a Hub id.
`reference_checkpoint.py` reads it and names its weights; this module checks the bases, builds the model and saves
it. The base weights in the checkpoint are not converted: the output names the bases and loads them from there, and
a few of them are compared with the bases named here first, so that a LayAlign trained on one LLM is not put on
another of the same shape.
"""

import argparse
import logging as std_logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel
from transformers.utils import logging

from ..bases_layalign import evenly_spaced_positions
from ..configuration_layalign import LayAlignConfig
from ..modeling_layalign import LayAlignForCausalLM
from ..processing_layalign import LayAlignProcessor
from .reference_checkpoint import (
    BASE_SAMPLE_SIZE,
    DEFAULT_ENCODER,
    DEFAULT_LLM,
    WRAPPER_SEGMENTS,
    ReferenceCheckpoint,
    check_layout,
    converted_tensors,
    load_reference_state_dict,
    resolve_weight_files,
    sort_reference_keys,
)


logger = logging.get_logger(__name__)


def check_base_weights(model: LayAlignForCausalLM, checkpoint: ReferenceCheckpoint) -> None:
    """Compares a few base weights saved in the checkpoint with the bases loaded into `model`.

    A LayAlign trained on one LLM gives garbage over another of the same shape (MetaMath-7B against Llama-2-7B),
    and so does a checkpoint whose bases were trained. Compared: each base's input embedding and its middle and last
    parameters, on `BASE_SAMPLE_SIZE` evenly spaced values, with a tolerance of one step of the coarser of the two
    dtypes, so that a checkpoint saved in fp16 or bf16 passes against float32 bases and vice versa.
    """
    for role, source_field, base, saved in (
        ("encoder", "--encoder", model.encoder, checkpoint.encoder_weights),
        ("LLM", "--llm", model.llm, checkpoint.llm_weights),
    ):
        if not saved:
            logger.warning(
                f"The checkpoint holds no {role} weights to compare with the {role} named by {source_field}; make "
                "sure it is the one the checkpoint was trained with."
            )
            continue
        compared = 0
        for name, weight, is_embedding in _weights_to_compare(base):
            key = _find_saved_weight(saved, name, weight, is_embedding)
            if key is None:
                continue
            compared += 1
            if not _same_values(saved[key], weight):
                raise ValueError(
                    f"The {role} named by {source_field} is not the one this checkpoint was trained with: its "
                    f"`{name}` differs from the checkpoint's `{checkpoint.root}{key}`. Its LayAlign weights would give "
                    f"wrong results over it. Name the base it was trained on (or, if the checkpoint's {role} was "
                    "itself trained, it cannot be converted to a LayAlign-only checkpoint)."
                )
        if compared == 0:
            logger.warning(f"Found none of the {role}'s weights to compare among the checkpoint's {role} weights.")
        else:
            logger.info(f"{compared} weights of the {role} match the checkpoint's copy.")


def _weights_to_compare(base: PreTrainedModel) -> list[tuple[str, torch.Tensor, bool]]:
    """`(name, weight, is_embedding)` of the base's input embedding and of its middle and last parameters (a layer
    weight, and the last norm or the LM head)."""
    parameters = list(base.named_parameters())
    embedding = base.get_input_embeddings().weight
    chosen = [(name, weight, True) for name, weight in parameters if weight is embedding][:1]
    for index in (len(parameters) // 2, len(parameters) - 1):
        if parameters[index][1] is not embedding:
            chosen.append((*parameters[index], False))
    return chosen


def _find_saved_weight(
    saved: dict[str, torch.Tensor], name: str, weight: torch.Tensor, is_embedding: bool
) -> str | None:
    """The checkpoint key holding the base weight `name`: the one key ending in the longest suffix of `name` that
    any key ends in (`None` when several do).

    The reference's wrappers change the front of the names (`model_llm.model.` for peft's wrapper, `encoder_mt.`
    for mT5's encoder stack) and put `model.` inside adapted attentions. An embedding may have another name there
    (mT5's `shared` is `encoder_mt.embed_tokens`), so for it a key named like an embedding, of the same shape, will do.
    """
    normalised = {_unwrap(key): key for key in saved}
    parts = name.split(".")
    for start in range(len(parts) - 1):
        suffix = ".".join(parts[start:])
        matches = [key for plain, key in normalised.items() if plain == suffix or plain.endswith("." + suffix)]
        if matches:
            return matches[0] if len(matches) == 1 else None
    if is_embedding:
        embeddings = [
            key for key in saved
            if key.endswith(("embed_tokens.weight", "shared.weight", "word_embeddings.weight", "llm_embedding_layer.weight"))
            and saved[key].shape == weight.shape
        ]  # fmt: skip
        return embeddings[0] if embeddings else None
    return None


def _unwrap(key: str) -> str:
    for wrapped, plain in WRAPPER_SEGMENTS:
        key = key.replace(wrapped, plain)
    return key


def _same_values(saved: torch.Tensor, loaded: torch.Tensor) -> bool:
    """Whether two copies of a weight agree, up to one rounding step of the coarser of their two dtypes."""
    if saved.shape != loaded.shape:
        return False
    flat_saved, flat_loaded = saved.reshape(-1), loaded.detach().reshape(-1)
    positions = evenly_spaced_positions(flat_saved.numel(), BASE_SAMPLE_SIZE)
    a = flat_saved[positions].float()
    b = flat_loaded[positions.to(flat_loaded.device)].float().cpu()
    if not (saved.dtype.is_floating_point and loaded.dtype.is_floating_point):
        return torch.equal(a, b)
    coarse = max((torch.finfo(saved.dtype), torch.finfo(loaded.dtype)), key=lambda info: info.eps)
    return torch.allclose(a, b, rtol=coarse.eps, atol=coarse.smallest_normal)


# -- building and saving ------------------------------------------------------------------------------------------------


def save_processor(output_dir: Path, encoder: str, llm: str) -> None:
    """Saves a `LayAlignProcessor` from the bases' tokenizers, or logs why not (a base folder without tokenizer)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(llm)
        encoder_tokenizer = AutoTokenizer.from_pretrained(encoder)
    except (OSError, ValueError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        logger.info(f"No processor saved: the bases' tokenizers did not load ({reason}).")
        return
    if tokenizer.pad_token is None:
        # As the reference does (`tokenizer_llm.pad_token = tokenizer_llm.eos_token`).
        tokenizer.pad_token = tokenizer.eos_token
    LayAlignProcessor(tokenizer=tokenizer, encoder_tokenizer=encoder_tokenizer).save_pretrained(output_dir)


def convert_reference_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    encoder: str | os.PathLike = DEFAULT_ENCODER,
    llm: str | os.PathLike = DEFAULT_LLM,
    *,
    fused_encoder_layers: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
    base_dtype: torch.dtype | str | None = None,
    check_bases: bool = True,
) -> Path:
    """Converts a reference LayAlign / MindMerger checkpoint into a LayAlign-only checkpoint in `output_dir`.

    Args:
        source: a pickled state dict, a folder holding one (or shards with `pytorch_model.bin.index.json`), or a
            Hub id.
        output_dir: where the LayAlign-only checkpoint (and the processor, when the bases have tokenizers) goes.
        encoder, llm: Hub ids or folders of the bases the checkpoint was trained on; recorded in the config.
        fused_encoder_layers: the reference config's `encoder_layers`, needed only when `fc1` does not read all the
            encoder's layers.
        dtype: dtype of the converted LayAlign weights (fp16 / bf16 values are converted to it).
        base_dtype: dtype to load the bases in for the conversion (`torch.bfloat16` halves the memory of a 7B LLM).
        check_bases: compare the base weights the checkpoint holds with `encoder` and `llm` (see
            [`check_base_weights`]).

    Returns the output folder. Raises a `ValueError` naming every unknown, missing and mis-shaped key, and one
    naming the base when the checkpoint's copy of a base differs from the named one; nothing is written then.
    """
    encoder, llm, output_dir = os.fspath(encoder), os.fspath(llm), Path(output_dir)
    if not dtype.is_floating_point:
        raise ValueError(f"`dtype` must be a floating-point dtype (float32, bfloat16, float16), got {dtype}.")
    weight_files = resolve_weight_files(source)
    check_output_dir(output_dir, weight_files)
    encoder_config, llm_config = load_base_config(encoder, "--encoder"), load_base_config(llm, "--llm")
    checkpoint = sort_reference_keys(load_reference_state_dict(weight_files))
    logger.info(
        f"{source}: {len(checkpoint.layalign) + len(checkpoint.gates)} LayAlign weights, "
        f"{len(checkpoint.encoder_weights) + len(checkpoint.llm_weights)} base weights (not converted), "
        f"outer prefix {checkpoint.root!r}."
    )
    config_kwargs = check_layout(checkpoint, encoder_config, llm_config, fused_encoder_layers)

    base_kwargs = {} if base_dtype is None else {"dtype": base_dtype}
    model = LayAlignForCausalLM.from_base_models(
        encoder, llm, encoder_kwargs=base_kwargs, llm_kwargs=dict(base_kwargs), **config_kwargs
    )
    if check_bases:
        check_base_weights(model, checkpoint)
    for name in model.layalign_module_names:
        if (module := getattr(model, name)) is not None:
            module.to(dtype)
    model.load_layalign_state_dict({name: tensor.to(dtype) for name, tensor in converted_tensors(checkpoint).items()})
    model.eval().save_pretrained(output_dir, checkpoint_format="layalign_only")
    save_processor(output_dir, encoder, llm)
    logger.info(f"Wrote a LayAlign-only checkpoint ({_describe_config(model.config)}) to {output_dir}.")
    return output_dir


def check_output_dir(output_dir: Path, weight_files: list[Path]) -> None:
    """Refuses, before anything is read or moved, an OUTPUT_DIR that is a file or that holds the source's files (a
    save replaces the weight files it finds there)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"OUTPUT_DIR {os.fspath(output_dir)!r} is a file: pass a folder for the converted checkpoint.")
    inside = [path for path in weight_files if path.resolve().is_relative_to(output_dir.resolve())]
    if inside:
        raise ValueError(
            f"OUTPUT_DIR {os.fspath(output_dir)!r} holds the checkpoint being converted ({os.fspath(inside[0])}), "
            "which saving there would replace: pass another folder."
        )


def load_base_config(name: str, flag: str):
    """The config of the base named by `flag`, or an `OSError` naming the flag and what to pass."""
    looks_local = os.path.isabs(name) or name.startswith((".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise OSError(f"{flag} {name!r} is not a folder on this machine: pass the folder or Hub id of that base.")
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(f"{flag} {name!r} cannot be loaded ({reason}): pass the folder or Hub id of that base.") from error


def _describe_config(config: LayAlignConfig) -> str:
    if not config.use_layer_fusion:
        return "MindMerger: input mapping only"
    return (
        f"{len(config.adapted_llm_layers)} adapted LLM layers, {len(config.fused_encoder_layers)} fused encoder "
        f"states, {config.fusion_structure} fusion"
    )


# -- command line -------------------------------------------------------------------------------------------------------


def _parse_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return name
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise argparse.ArgumentTypeError(f"{name!r} is not a floating-point torch dtype (pass float32, bfloat16 or float16)")
    return dtype


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_layalign.conversion.convert",
        description="Convert a reference LayAlign / MindMerger checkpoint (pickled pytorch_model.bin, possibly "
        "sharded) into a LayAlign-only checkpoint that LayAlignForCausalLM.from_pretrained loads.",
    )
    parser.add_argument("source", help="pytorch_model.bin, a folder holding it (or its shards and index), or a Hub id")
    parser.add_argument("output_dir", help="folder for the LayAlign-only checkpoint")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help=f"encoder it was trained on (default {DEFAULT_ENCODER})")
    parser.add_argument("--llm", default=DEFAULT_LLM, help=f"LLM it was trained on (default {DEFAULT_LLM})")
    parser.add_argument(
        "--fused_encoder_layers", type=int, nargs="+", default=None,
        help="the reference config's encoder_layers, when fc1 does not read all the encoder's layers",
    )  # fmt: skip
    parser.add_argument("--dtype", type=_parse_dtype, default=torch.float32, help="dtype of the LayAlign weights")
    parser.add_argument(
        "--base_dtype", type=_parse_dtype, default=None,
        help="dtype to load the bases in while converting (bfloat16 halves the memory; default: the bases' own)",
    )  # fmt: skip
    parser.add_argument(
        "--no_check_base_weights", dest="check_bases", action="store_false",
        help="do not compare the base weights the checkpoint holds with --encoder / --llm",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_arguments(argv)
    std_logging.basicConfig(level=std_logging.INFO, format="%(message)s")
    logger.setLevel(std_logging.INFO)
    try:
        output_dir = convert_reference_checkpoint(
            args.source,
            args.output_dir,
            encoder=args.encoder,
            llm=args.llm,
            fused_encoder_layers=args.fused_encoder_layers,
            dtype=args.dtype,
            base_dtype=args.base_dtype,
            check_bases=args.check_bases,
        )
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from error
    logger.info(f"LayAlign-only checkpoint written to {output_dir}")
    return output_dir


if __name__ == "__main__":
    main()
