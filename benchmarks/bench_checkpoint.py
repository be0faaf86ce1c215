"""Checkpoint size: LayAlign-only against the full model (the form the reference code saves).

    python benchmarks/bench_checkpoint.py --preset demo
    python benchmarks/bench_checkpoint.py --preset paper        # one GPU; the full form is counted, not written

Both forms are written by `save_pretrained` into a temporary folder and measured on disk (every file:
safetensors, config, generation config). For `paper` the full form (some 17 GB) is not written unless
`--write_full` is given: its size is the sum of its state dict's tensor bytes, which is what safetensors stores
apart from a small header.
"""

import tempfile
import time
from pathlib import Path

from common import argument_parser, build_models, print_table, write_json


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def save(model, folder: Path, checkpoint_format: str) -> dict:
    start = time.perf_counter()
    model.save_pretrained(folder, checkpoint_format=checkpoint_format)
    return {"bytes": folder_bytes(folder), "save_seconds": time.perf_counter() - start, "written": True}


def state_dict_bytes(model) -> int:
    tensors = {id(tensor): tensor for tensor in model.state_dict().values()}  # tied weights count once
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__)
    parser.add_argument("--write_full", action="store_true", help="Write the full form for `paper` too.")
    args = parser.parse_args(argv)
    model = build_models(args.preset).layalign
    # Random bases have no name to reload them from; give them one so the LayAlign-only form can be written.
    model.config.encoder_name_or_path = model.config.encoder_name_or_path or "random-encoder"
    model.config.llm_name_or_path = model.config.llm_name_or_path or "random-llm"
    results = {"preset": args.preset}
    with tempfile.TemporaryDirectory() as directory:
        results["LayAlign-only"] = save(model, Path(directory, "layalign_only"), "layalign_only")
        if args.preset != "paper" or args.write_full:
            results["full"] = save(model, Path(directory, "full"), "full")
        else:
            results["full"] = {"bytes": state_dict_bytes(model), "save_seconds": None, "written": False}
    full = results["full"]["bytes"]
    rows = [
        [
            name,
            f"{entry['bytes'] / 2**20:,.1f}",
            f"{entry['bytes'] / full:.4f}",
            "not written" if entry["save_seconds"] is None else f"{entry['save_seconds']:.2f}",
        ]
        for name, entry in results.items()
        if name != "preset"
    ]
    print_table(f"checkpoint size, preset {args.preset}", ["form", "MiB", "vs full", "save s"], rows)
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
