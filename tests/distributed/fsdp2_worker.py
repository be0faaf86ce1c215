"""One process of the FSDP2 check (`torchrun --nproc_per_node 2`, gloo, CPU): tiny Llama + mT5 LayAlign, each
`LlamaDecoderLayer` and `MT5Block` wrapped with `fully_shard`, then the root, as `configuration/accelerate/fsdp.yaml`
does. Against an unsharded copy of the same model in the same process:

- the loss of a step on each rank's half of the global batch, averaged over the ranks, equals the single-process loss
  on the whole batch, and every trainable parameter's gradient (gathered) equals the single-process gradient;
- `generate` works under FSDP2 (after `register_fsdp_forward_method`) and gives the unsharded model's tokens;
- a LayAlign-only `save_pretrained` from the gathered full state dict reloads with the unsharded model's logits.

Writes `result-<rank>.json` into the folder given as the only argument.
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mt5.modeling_mt5 import MT5Block

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import set_gates, tiny_model  # noqa: E402


def global_batch() -> dict[str, torch.Tensor]:
    """Four examples with no padding, so that both ranks' halves hold the same number of target tokens."""
    generator = torch.Generator().manual_seed(0)
    return {
        "encoder_input_ids": torch.randint(4, 90, (4, 6), generator=generator),
        "input_ids": torch.randint(4, 120, (4, 5), generator=generator),
        "labels": torch.randint(4, 120, (4, 5), generator=generator),
    }


def main(output_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = tiny_model("llama", "mt5")
    set_gates(reference, 0.5)
    model = copy.deepcopy(reference)
    batch = global_batch()
    local = {name: value.chunk(world)[rank] for name, value in batch.items()}

    reference_loss = reference(**batch).loss
    reference_loss.backward()
    for module in (*model.llm.get_decoder().layers, *model.encoder.encoder.block):
        assert isinstance(module, (LlamaDecoderLayer, MT5Block))
        fully_shard(module)
    fully_shard(model)

    loss = model(**local).loss
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    worst_grad = 0.0
    for (name, parameter), (_, expected) in zip(model.named_parameters(), reference.named_parameters()):
        if parameter.requires_grad:
            worst_grad = max(worst_grad, (parameter.grad.full_tensor() - expected.grad).abs().max().item())

    register_fsdp_forward_method(model, "generate")
    with torch.no_grad():
        prompt = local["input_ids"][:, :3]
        generated = model.generate(
            input_ids=prompt, encoder_input_ids=local["encoder_input_ids"], max_new_tokens=4, do_sample=False
        )
        expected_generated = reference.generate(
            input_ids=prompt, encoder_input_ids=local["encoder_input_ids"], max_new_tokens=4, do_sample=False
        )

    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    reload_error = None
    if rank == 0:
        model.save_pretrained(output_dir / "checkpoint", state_dict=full_state)
        reloaded = copy.deepcopy(reference)
        for name in reloaded.layalign_module_names:
            getattr(reloaded, name).apply(reloaded._init_weights)
        reloaded.load_layalign_state_dict(load_file(output_dir / "checkpoint" / "model.safetensors"))
        with torch.no_grad():
            reload_error = (reloaded(**batch).logits - reference(**batch).logits).abs().max().item()
    result = {
        "loss": mean_loss.item(),
        "reference_loss": reference_loss.item(),
        "worst_grad_difference": worst_grad,
        "generate_equal": torch.equal(generated, expected_generated),
        "reload_logit_difference": reload_error,
    }
    (output_dir / f"result-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
