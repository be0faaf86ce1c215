"""One process of the sharded-training check: `torchrun --nproc_per_node 2 engine_worker.py ENGINE ENCODER LLM OUT`
(gloo, CPU), ENGINE one of `fsdp2`, `fsdp1`, `zero2`, `zero3`, on a LayAlign model built from the tiny bases in the
ENCODER and LLM folders. The engine is set up from the shipped accelerate config, with accelerate's own code where
it has some that runs on a CPU (accelerate itself routes CPU processes to DDP):

- `fsdp2`: `configuration/accelerate/fsdp.yaml` -> accelerate's `FullyShardedDataParallelPlugin` and its
  transformer-based wrap policy (every class in the model's `_no_split_modules`) -> accelerate's own
  `fsdp2_prepare_model` (`fully_shard` on each unit, on the input embeddings, on the final norm with the output
  layer, then the root);
- `fsdp1`: the same policy with `FullyShardedDataParallel(use_orig_params=True)`;
- `zero2` / `zero3`: `configuration/accelerate/deepspeed_zero{2,3}.yaml` -> accelerate's `DeepSpeedPlugin` ->
  `deepspeed.initialize` (`DS_ACCELERATOR=cpu`). With the config's `zero3_init_flag` on, the plugin is registered
  with transformers before any model is built, as `TrainingArguments` does under `accelerate launch`, so that
  `from_base_models` loads every base weight already partitioned (`deepspeed.zero.Init`).

Against an unsharded copy of the same model stepped in the same process, it measures and writes to
`OUT/result-<rank>.json`: the loss of a step (each rank's half of the global batch, averaged) against the
single-process loss on the whole batch; the largest difference of a trainable parameter after one SGD step (lr 1, so
it is the gradients' difference, clipped as the config clips); whether `generate` gives the same tokens; the logit
difference of a LayAlign-only `save_pretrained` from the engine's gathered weights, reloaded with `from_pretrained`;
and, after saving the engine's own training checkpoint (model and optimizer state) and taking three more steps, the
difference between those steps (losses and weights) and the same steps taken by a fresh engine, built from that
LayAlign-only save and resumed from the checkpoint; the largest difference of the collapse monitor's statistics from the unsharded copy's;
and how many elements of the bases' weights each process held once the model was built, by `from_base_models` and
by `from_pretrained` of the save (0 when they load partitioned).
"""

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.state_dict import StateDictOptions
from transformers import AutoTokenizer, set_seed
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from modeling_layalign import LayAlignForCausalLM, LayAlignProcessor  # noqa: E402
from modeling_layalign.training.distributed_exit import exit_without_finalization  # noqa: E402
from modeling_layalign.training.monitoring import mapping_statistics  # noqa: E402
from tests.conftest import set_gates  # noqa: E402


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configuration" / "accelerate"
CONFIG_OF_ENGINE = {"fsdp2": "fsdp.yaml", "fsdp1": "fsdp1.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}
MICRO_BATCH = 2
LEARNING_RATE = 1.0
# Steps taken after the training checkpoint, by the run that saved it and by the run resumed from it.
RESUMED_STEPS = 3
# Optimizer state keyed by flat parameter names, which loads into an optimizer that has taken no step yet.
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """Four examples with no padding, so that both ranks' halves hold the same number of target tokens."""
    generator = torch.Generator().manual_seed(step)
    return {
        "encoder_input_ids": torch.randint(4, 90, (4, 6), generator=generator),
        "input_ids": torch.randint(4, 120, (4, 5), generator=generator),
        "labels": torch.randint(4, 120, (4, 5), generator=generator),
    }


def local_half(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.chunk(dist.get_world_size())[dist.get_rank()] for name, value in batch.items()}


def build_model(encoder: str, llm: str) -> LayAlignForCausalLM:
    set_seed(0)
    model = LayAlignForCausalLM.from_base_models(encoder, llm, encoder_dropout_in_training=False)
    set_gates(model, 0.5)
    return model.train()


def accelerate_config(engine: str) -> dict:
    return yaml.safe_load((ACCELERATE_CONFIGS / CONFIG_OF_ENGINE[engine]).read_text())


def sgd(parameters) -> torch.optim.Optimizer:
    """SGD with momentum: a step moves each weight by its gradient (lr 1), and the momentum is optimizer state that a
    resumed run must restore."""
    return torch.optim.SGD([p for p in parameters if p.requires_grad], lr=LEARNING_RATE, momentum=0.9)


class Engine:
    """One model under one engine: step, gather, generate, save for `from_pretrained`, checkpoint and resume."""

    def __init__(self, name: str, model: LayAlignForCausalLM, plugin=None):
        self.name, self.model = name, model
        self.clip = None
        if name.startswith("fsdp"):
            self._wrap_fsdp(accelerate_config(name)["fsdp_config"])
            self.optimizer = sgd(self.wrapped.parameters())
        else:
            self._wrap_deepspeed(plugin)

    def _wrap_fsdp(self, fsdp_config: dict) -> None:
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

        version = fsdp_config["fsdp_version"]
        assert version == (2 if self.name == "fsdp2" else 1), f"{CONFIG_OF_ENGINE[self.name]} is FSDP {version}"
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=version,
            auto_wrap_policy=fsdp_config["fsdp_auto_wrap_policy"].lower(),
            transformer_cls_names_to_wrap=fsdp_config.get("fsdp_transformer_layer_cls_to_wrap"),
            reshard_after_forward=fsdp_config.get("fsdp_reshard_after_forward", fsdp_config.get("fsdp_sharding_strategy")),
            state_dict_type=fsdp_config["fsdp_state_dict_type"],
            use_orig_params=fsdp_config.get("fsdp_use_orig_params"),
        )
        policy = fsdp2_prepare_auto_wrap_policy(plugin, self.model)
        units = [module for module in self.model.modules() if policy(module)]
        assert units, "the shipped FSDP config wraps no module of this model"
        if self.name == "fsdp2":
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model
            from torch.distributed.fsdp import register_fsdp_forward_method

            # accelerate's own preparation, which `Trainer` runs: it reads these five attributes of the accelerator.
            # Full precision here, so that the step can be compared with one process exactly.
            accelerator = SimpleNamespace(
                state=SimpleNamespace(fsdp_plugin=plugin),
                mixed_precision="no",
                is_main_process=dist.get_rank() == 0,
                device=torch.device("cpu"),
                torch_device_mesh=None,
            )
            self.model = fsdp2_prepare_model(accelerator, self.model)
            register_fsdp_forward_method(self.model, "generate")
            self.wrapped = self.model
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            classes = {type(module) for module in units}
            self.wrapped = FullyShardedDataParallel(
                self.model,
                auto_wrap_policy=ModuleWrapPolicy(classes),
                sharding_strategy=plugin.sharding_strategy,
                use_orig_params=plugin.use_orig_params,
                device_id=torch.device("cpu"),  # as accelerate passes its device; FSDP 1 needs it named on a CPU
            )

    def _wrap_deepspeed(self, plugin) -> None:
        import deepspeed

        config = fill_auto(plugin.deepspeed_config)
        self.clip = config.get("gradient_clipping")
        self.wrapped, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=sgd(self.model.parameters()), config=config
        )

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        loss = self.wrapped(**local_half(batch)).loss
        if self.name.startswith("zero"):
            self.wrapped.backward(loss)
            self.wrapped.step()
        else:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        return mean_loss.item() / dist.get_world_size()

    def gathered(self):
        """A context in which every parameter of `self.model` holds its whole value."""
        if self.name == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel.summon_full_params(self.wrapped, writeback=False)
        if self.name == "zero3":
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.model.parameters()))
        return nullcontext()

    def trainable(self) -> dict[str, torch.Tensor]:
        with self.gathered():
            return {
                name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for name, p in self.model.named_parameters()
                if p.requires_grad
            }

    def generate(self, **inputs) -> torch.Tensor:
        """FSDP1 shards the root unit's weights outside the root's forward, so `generate` runs with the weights
        gathered; FSDP2 gathers them itself once `generate` is registered; ZeRO-3 gathers per module call."""
        with torch.no_grad(), (self.gathered() if self.name == "fsdp1" else nullcontext()):
            return self.model.generate(**inputs, max_new_tokens=4, do_sample=False)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """What `Trainer` passes to `save_pretrained` under this engine (accelerate's `get_state_dict`)."""
        if self.name == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.name == "fsdp1":
            from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

            # accelerate also offloads to the CPU; with the weights already there, FSDP 1's copy crashes (SIGSEGV).
            full = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
            with FullyShardedDataParallel.state_dict_type(self.wrapped, StateDictType.FULL_STATE_DICT, full):
                return self.wrapped.state_dict()
        if self.name == "zero3":
            return self.wrapped._zero3_consolidated_16bit_state_dict()
        return self.model.state_dict()

    def save_checkpoint(self, folder: Path) -> None:
        """The engine's own training checkpoint, as `Trainer` writes it: DeepSpeed's `save_checkpoint`, or for FSDP
        the sharded model and optimizer state through `torch.distributed.checkpoint` (accelerate's
        `save_fsdp_model` / `save_fsdp_optimizer` with a sharded state dict)."""
        if self.name.startswith("zero"):
            self.wrapped.save_checkpoint(str(folder))
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.wrapped, self.optimizer, options=FLAT)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))

    def load_checkpoint(self, folder: Path) -> None:
        if self.name.startswith("zero"):
            self.wrapped.load_checkpoint(str(folder))
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.wrapped, self.optimizer, options=FLAT)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(
            self.wrapped,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=FLAT,
        )


def deepspeed_plugin(engine: str):
    """accelerate's `DeepSpeedPlugin` from the shipped config; with `zero3_init_flag` on, registered with transformers
    (what `TrainingArguments` does under `accelerate launch`) so that `from_pretrained` partitions while it loads. The
    plugin must stay alive for that."""
    from accelerate.utils import DeepSpeedPlugin

    deepspeed_config = accelerate_config(engine)["deepspeed_config"]
    plugin = DeepSpeedPlugin(
        zero_stage=deepspeed_config["zero_stage"],
        gradient_clipping=deepspeed_config["gradient_clipping"],
        offload_optimizer_device=deepspeed_config["offload_optimizer_device"],
        offload_param_device=deepspeed_config["offload_param_device"],
        zero3_init_flag=deepspeed_config["zero3_init_flag"],
        zero3_save_16bit_model=deepspeed_config.get("zero3_save_16bit_model", False),
    )
    if plugin.zero3_init_flag:
        plugin.set_deepspeed_weakref()
    return plugin


def base_elements_held(model: LayAlignForCausalLM) -> int:
    """Elements of the encoder's and the LLM's weights this process holds (a partitioned weight holds none)."""
    return sum(parameter.numel() for name, parameter in model.named_parameters() if name.startswith(("encoder.", "llm.")))


def fill_auto(config: dict) -> dict:
    """The values accelerate fills in for DeepSpeed's `"auto"` entries when it prepares the engine."""
    config = json.loads(json.dumps(config))
    config["train_micro_batch_size_per_gpu"] = MICRO_BATCH
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = MICRO_BATCH * dist.get_world_size()
    config["zero_allow_untested_optimizer"] = True
    config.setdefault("zero_optimization", {}).update(
        {key: value for key, value in {"stage3_gather_16bit_weights_on_model_save": True}.items()}
    )
    for section in (config, config["zero_optimization"]):
        for key in [key for key, value in section.items() if value == "auto"]:
            del section[key]
    return config


def reference_step(reference: LayAlignForCausalLM, optimizer, batch, clip: float | None) -> float:
    loss = reference(**batch).loss
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], clip)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def largest_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys(), (sorted(first)[:3], sorted(second)[:3])
    return max((first[name].float() - second[name].float()).abs().max().item() for name in first)


def main(engine_name: str, encoder: str, llm: str, output_dir: Path) -> None:
    plugin = None
    if engine_name.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # as accelerate sets DeepSpeed up
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    processor = LayAlignProcessor(
        tokenizer=AutoTokenizer.from_pretrained(llm), encoder_tokenizer=AutoTokenizer.from_pretrained(encoder)
    )
    reference = build_model(encoder, llm)
    if engine_name.startswith("zero"):
        plugin = deepspeed_plugin(engine_name)
    model = build_model(encoder, llm)
    held_after_loading = base_elements_held(model)
    engine = Engine(engine_name, model, plugin)
    reference_optimizer = sgd(reference.parameters())

    first = global_batch(1)
    loss = engine.step(first)
    reference_loss = reference_step(reference, reference_optimizer, first, engine.clip)
    reference_weights = {name: p.detach().clone() for name, p in reference.named_parameters() if p.requires_grad}
    step_difference = largest_difference(engine.trainable(), reference_weights)

    # The collapse monitor's statistics, which every process computes at once (`MappingCollapseCallback`).
    reference.eval()
    statistics = mapping_statistics(engine.model if engine.name != "fsdp1" else engine.wrapped, processor)
    expected = mapping_statistics(reference, processor)
    reference.train()
    statistics_difference = max(abs(statistics[name] - expected[name]) for name in expected)

    prompt = local_half(first)
    inputs = {"input_ids": prompt["input_ids"][:, :3], "encoder_input_ids": prompt["encoder_input_ids"]}
    generated = engine.generate(**inputs)
    with torch.no_grad():
        generate_equal = torch.equal(generated, reference.generate(**inputs, max_new_tokens=4, do_sample=False))

    full_state = engine.full_state_dict()
    reload_difference = None
    if rank == 0:
        engine.model.save_pretrained(output_dir / "saved", state_dict=full_state)
        unset_hf_deepspeed_config()  # one process reloads: not partitioned over all
        reloaded = LayAlignForCausalLM.from_pretrained(output_dir / "saved").eval()
        if plugin is not None and plugin.zero3_init_flag:
            set_hf_deepspeed_config(plugin.dschf)
        with torch.no_grad():
            reference.eval()
            reload_difference = (reloaded(**first).logits - reference(**first).logits).abs().max().item()
            reference.train()

    engine.save_checkpoint(output_dir / "checkpoint")
    later = [global_batch(step) for step in range(2, 2 + RESUMED_STEPS)]
    continued_losses = [engine.step(batch) for batch in later]
    continued = engine.trainable()
    dist.barrier()  # rank 0 has saved
    # The resumed run starts from the LayAlign-only checkpoint, as stage 2 starts from stage 1 (`--init_from`).
    restarted = LayAlignForCausalLM.from_pretrained(output_dir / "saved").train()
    held_after_reloading = base_elements_held(restarted)
    resumed = Engine(engine_name, restarted, plugin)
    resumed.load_checkpoint(output_dir / "checkpoint")
    resumed_losses = [resumed.step(batch) for batch in later]
    resume_difference = largest_difference(resumed.trainable(), continued)

    result = {
        "loss": loss,
        "reference_loss": reference_loss,
        "step_difference": step_difference,
        "generate_equal": generate_equal,
        "reload_logit_difference": reload_difference,
        "resume_difference": resume_difference,
        "resumed_losses_equal": resumed_losses == continued_losses,
        "statistics_difference": statistics_difference,
        "base_elements_held_after_loading": held_after_loading,
        "base_elements_held_after_reloading": held_after_reloading,
    }
    (output_dir / f"result-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    # Everything this worker reports is written: leave without the finalization that could abort it over the
    # process groups the engines keep alive (issue #32, see `modeling_layalign.training.distributed_exit`).
    exit_without_finalization()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
