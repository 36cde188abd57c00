"""Sharded training (accelerate's FSDP2 plugin, DeepSpeed ZeRO-2) for the weight-training baselines.

``sft`` and ``grpo`` shard through their Trainer, ``reinforce_pp`` through ``fsdp_prepare`` (FSDP2 only). FSDP2
changes the model IN PLACE: every parameter becomes a DTensor holding 1/N of it and every forward all-gathers them.
Evaluation and RL rollouts run a different number of forwards on each process (uneven shards, completions that
stop at different steps), so those collectives would deadlock, and the checkpoint (written by the main process
alone) and ``check_in_sync`` would see shards. So after training every process gathers the weights once and keeps
them whole (``gather_weights``: forwards then make no collectives, as in DDP), and the next training puts the
shards back first (``shard_weights``). Both are no-ops otherwise, and every process must call them. ZeRO-2 keeps
whole parameters on every process and needs neither.

Verified on CPU with 2 gloo processes (``tests/test_distributed_sharded.py``; by hand: the weights after each task
are bit-identical to a DDP run's). On CPU accelerate 1.15 silently drops FSDP and DeepSpeed from a launch (plain
DDP runs instead); ``harness.distributed.state`` works around it (``honour_fsdp_on_cpu``, ``deepspeed_on_cpu``).
Refused (``check_supported``): ZeRO-3, whose hooks all-gather in every evaluation forward (see its message), and
FSDP1, whose flat parameters leave the peft model's own parameters sharded outside ``summon_full_params`` (and
whose accelerate plugin needs a GPU, so it cannot be tried here).
"""

from __future__ import annotations

import os
from typing import Any

from harness.distributed import launched


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def fsdp_on_cpu() -> bool:
    """A launch with an FSDP config (``accelerate launch`` sets ACCELERATE_USE_FSDP) on CPU processes."""
    return launched() and _flag("ACCELERATE_USE_FSDP") and (_flag("ACCELERATE_USE_CPU") or not _cuda())


def deepspeed_on_cpu() -> bool:
    """A launch with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED) on a machine without CUDA: DeepSpeed's CPU
    accelerator (``DS_ACCELERATOR=cpu``; it falls back to gloo without oneCCL)."""
    return launched() and _flag("ACCELERATE_USE_DEEPSPEED") and not _cuda()


def check_supported() -> None:
    """Refuse the sharded setups the runner cannot evaluate between tasks (a ``ConfigError`` naming the reason)."""
    from harness.config import ConfigError

    if _flag("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        # Tried on CPU (DeepSpeed 0.19.8): ZeRO-3's module hooks stay on the model after training, and once the
        # generate pattern breaks their recorded trace they release (re-partition) even ``ds_persist`` parameters
        # after each forward (PartitionedParameterCoordinator.release_sub_module), so every evaluation forward
        # all-gathers again; processes with different numbers of prompts or decoding steps then deadlock or crash.
        raise ConfigError("DeepSpeed ZeRO-3 is not supported: evaluation between tasks shards prompts over the "
                          "processes, and ZeRO-3 all-gathers parameters in every forward; use "
                          "configs/accelerate/fsdp.yaml (full sharding) or zero2.yaml")
    if _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "2") != "2":
        raise ConfigError("FSDP1 (fsdp_version: 1) is not supported; use fsdp_version: 2 "
                          "(configs/accelerate/fsdp.yaml)")


def honour_fsdp_on_cpu() -> None:
    """Make accelerate apply its FSDP plugin in a gloo CPU launch (idempotent).

    accelerate 1.15 turns a launch into FSDP only from a GPU-like type (``AcceleratorState.__init__``, the
    ``MULTI_GPU``/... branch); a CPU launch is ``MULTI_CPU``, so an FSDP config silently ran plain DDP. Every
    (re)initialised PartialState (transformers resets it per Trainer) is relabelled ``MULTI_GPU`` after its CPU/gloo
    setup, so the device and the process group stay CPU/gloo and the Accelerator then switches to FSDP."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    init = PartialState.__init__
    if getattr(init, "_memgen_fsdp_cpu", False):
        return

    def patched(self: Any, cpu: bool = False, **kwargs: Any) -> None:
        init(self, cpu, **kwargs)
        if PartialState._shared_state.get("distributed_type") == DistributedType.MULTI_CPU:
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU

    patched._memgen_fsdp_cpu = True  # type: ignore[attr-defined]
    PartialState.__init__ = patched  # type: ignore[method-assign]


def trainer_device_kwargs(device: str) -> dict[str, Any]:
    """``TrainingArguments`` device settings: ``use_cpu`` on CPU, except under DeepSpeed on CPU, where transformers
    must not pass cpu=True to accelerate (it would drop DeepSpeed) and the process group is gloo."""
    if deepspeed_on_cpu():
        return {"use_cpu": False, "ddp_backend": "gloo"}
    return {"use_cpu": device == "cpu"}


def sharding() -> str:
    """How training is distributed, for logs: accelerate's distributed type (FSDP, DEEPSPEED, MULTI_CPU, ...)."""
    from accelerate.state import AcceleratorState, PartialState

    shared = AcceleratorState._shared_state or PartialState._shared_state
    return str(shared.get("distributed_type", "NO")).split(".")[-1]


# -- FSDP2 ----------------------------------------------------------------------------------------------------------
_RESHARD_AFTER_FORWARD: dict[int, bool] = {}


def _fsdp_modules(model: Any) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def fsdp_sharded(model: Any) -> bool:
    """True if ``fully_shard`` (FSDP2) was applied to ``model`` or one of its submodules."""
    return bool(_fsdp_modules(model))


def _fsdp_gather(model: Any) -> None:
    modules = _fsdp_modules(model)
    if modules:
        # FSDP2 picks its root at the first forward; a peft model's ``generate`` skips the root's own forward, so a
        # rollout before any training forward would find several roots. The outermost module is the root.
        modules[0]._get_fsdp_state()._lazy_init()
        _keep_wrap_policy_findable(model, modules)
    for m in modules:
        # Each Trainer wraps ``generate`` in the root's FSDP pre/post-forward (``register_fsdp_forward_method``, an
        # instance attribute), once more per task; the outer post-forward of two nested wrappers reshards regardless
        # of reshard_after_forward, and the next generate call would all-gather on this process alone. With whole
        # weights generate needs no wrapper: drop it (the next Trainer adds one again).
        m.__dict__.pop("generate", None)
        groups = m._get_fsdp_state()._fsdp_param_groups  # the configured reshard_after_forward, to restore later
        _RESHARD_AFTER_FORWARD.setdefault(id(m), any(g._reshard_after_forward for g in groups))
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()


def _fsdp_shard(model: Any) -> None:
    for m in _fsdp_modules(model):
        if id(m) in _RESHARD_AFTER_FORWARD:
            m.set_reshard_after_forward(_RESHARD_AFTER_FORWARD.pop(id(m)), recurse=False)
        m.reshard()


def _keep_wrap_policy_findable(model: Any, modules: list[Any]) -> None:
    """Let the next task's ``accelerator.prepare`` accept the already-sharded model.

    accelerate 1.15 resolves TRANSFORMER_BASED_WRAP (``FullyShardedDataParallelPlugin.set_auto_wrap_policy``) from
    the class names in ``model._no_split_modules`` before it notices that the model is sharded already (it then
    leaves it as it is), and raises when no module has that class name; ``fully_shard`` renamed the wrapped classes
    (``Qwen2DecoderLayer`` -> ``FSDPQwen2DecoderLayer``). So the instance lists the renamed classes."""
    names = getattr(model, "_no_split_modules", None)
    if not names:
        return
    present = {type(m).__name__ for m in modules}
    model._no_split_modules = [f"FSDP{n}" if f"FSDP{n}" in present else n for n in names]


def fsdp_prepare(model: Any, optimizer: Any) -> Any:
    """Under an FSDP2 launch: shard ``model`` in place (once; later calls only re-map the parameters) and return
    ``optimizer`` prepared with it, its parameters swapped for the shards. Otherwise ``optimizer`` unchanged (DDP
    comes from ``ddp_model``). accelerate insists on preparing the model and its optimizer together under FSDP2."""
    if not (launched() and _flag("ACCELERATE_USE_FSDP")):
        return optimizer
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # A fresh FSDP plugin, as each Trainer makes (transformers resets the state the same way): the shared state
    # would otherwise keep the last Trainer's plugin, whose wrap policy names another model's (sharded) classes.
    # cpu= as the Trainer passes it: a PartialState re-made without it would see one process on a CPU machine.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=_flag("ACCELERATE_USE_CPU") or not _cuda())
    if not accelerator.is_fsdp2:
        return optimizer
    _, prepared = accelerator.prepare(model, optimizer)
    return prepared


# -- the two calls the methods make ---------------------------------------------------------------------------------
def gather_weights(model: Any) -> None:
    """After training: every process all-gathers the FSDP2-sharded parameters and keeps them whole, so
    ``model.parameters()`` are the plain full tensors (identical everywhere) and forwards make no collectives."""
    _fsdp_gather(model)


def shard_weights(model: Any) -> None:
    """Before training again: undo ``gather_weights`` (optimizers must be built on the shards)."""
    _fsdp_shard(model)
