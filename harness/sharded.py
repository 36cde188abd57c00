"""Sharded training (accelerate's FSDP2 plugin, DeepSpeed ZeRO-2/3) for the weight-training baselines.

``sft`` and ``grpo`` shard through their Trainer, ``reinforce_pp`` through ``fsdp_prepare`` / ``deepspeed_prepare``.
FSDP2
changes the model IN PLACE: every parameter becomes a DTensor holding 1/N of it and every forward all-gathers them.
Evaluation and RL rollouts run a different number of forwards on each process (uneven shards, completions that
stop at different steps), so those collectives would deadlock, and the checkpoint (written by the main process
alone) and ``check_in_sync`` would see shards. So after training every process gathers the weights once and keeps
them whole (``gather_weights``: forwards then make no collectives, as in DDP), and the next training puts the
shards back first (``shard_weights``). Both are no-ops otherwise, and every process must call them.

ZeRO-2 keeps whole parameters on every process. ZeRO-3 partitions them and its engine's module hooks all-gather
them around every forward (and after the trace of a training step breaks, even the persistent ones), so the same
rule applies: after training the engine is destroyed (``release_engine``: its hooks go) and every process gathers
the parameters whole (``deepspeed.zero.GatheredParameters``, held open until ``shard_weights``, which re-partitions
them for the next task's engine). Within a training (reinforce_pp's rollouts) ``whole_weights`` does the same around
a block while the engine lives, as TRL's ``unwrap_model_for_generation`` does.

Verified on CPU with 2 gloo processes (``tests/test_distributed_sharded.py``; by hand: the weights after each task
are bit-identical to a DDP run's). On CPU accelerate 1.15 silently drops FSDP and DeepSpeed from a launch (plain
DDP runs instead); ``harness.distributed.state`` works around it (``honour_fsdp_on_cpu``, ``deepspeed_on_cpu``).
Refused (``check_supported``): FSDP1, whose flat parameters leave the peft model's own parameters sharded outside
``summon_full_params`` (and whose accelerate plugin needs a GPU, so it cannot be tried here), and a ZeRO-3 config
that builds the model partitioned (``zero3_init_flag``), which the evaluation before any training cannot run.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from harness.distributed import SYNC_LOG_ENV, launched


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def fsdp_launch() -> bool:
    """A launch with an FSDP config (``accelerate launch`` sets ACCELERATE_USE_FSDP)."""
    return launched() and _flag("ACCELERATE_USE_FSDP")


def fsdp_on_cpu() -> bool:
    """An FSDP launch on CPU processes."""
    return fsdp_launch() and (_flag("ACCELERATE_USE_CPU") or not _cuda())


def deepspeed_launch() -> bool:
    """A launch with a DeepSpeed config (``accelerate launch`` sets ACCELERATE_USE_DEEPSPEED)."""
    return launched() and _flag("ACCELERATE_USE_DEEPSPEED")


SHARDING_METHODS = ("sft", "grpo", "reinforce_pp")  # the methods that train through an FSDP/DeepSpeed config


def unsharded_methods(methods: list[str] | tuple[str, ...]) -> list[str]:
    """The methods of a run that train data-parallel with whole weights although the launch asks for FSDP or
    DeepSpeed (MemGen's and the retrieval methods' own loops sum gradients by all-reduce, with no engine); empty
    outside such a launch. ``run`` says so in one line rather than let the config look applied."""
    if not (fsdp_launch() or deepspeed_launch()):
        return []
    return [m for m in methods if m not in SHARDING_METHODS and m != "vanilla"]


def deepspeed_on_cpu() -> bool:
    """A launch with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED) on a machine without CUDA: DeepSpeed's CPU
    accelerator (``DS_ACCELERATOR=cpu``; it falls back to gloo without oneCCL)."""
    return deepspeed_launch() and not _cuda()


def check_supported() -> None:
    """Refuse the sharded setups the runner cannot evaluate between tasks (a ``ConfigError`` naming the reason)."""
    from harness.config import ConfigError

    if _flag("ACCELERATE_USE_DEEPSPEED") and _flag("ACCELERATE_DEEPSPEED_ZERO3_INIT"):
        # zero.Init would build the model partitioned, without the engine hooks that gather it for a forward:
        # the evaluation before any training (row 0 of the matrix) could not run. Each process loads it whole
        # instead (as under DDP) and the first engine partitions it.
        raise ConfigError("DeepSpeed zero3_init_flag: true is not supported (the model is evaluated before any "
                          "training); set zero3_init_flag: false in the accelerate config (configs/accelerate/"
                          "zero3.yaml)")
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


def sharding(method: str | None = None) -> str:
    """How ``method`` trains, for logs: accelerate's distributed type (FSDP, DEEPSPEED_ZERO3, MULTI_CPU, ...), or
    DATA_PARALLEL for a method that shards nothing whatever the launch (see ``unsharded_methods``)."""
    from accelerate.state import AcceleratorState, PartialState

    if method is not None and unsharded_methods([method]):
        return "DATA_PARALLEL"

    shared = AcceleratorState._shared_state or PartialState._shared_state
    kind = str(shared.get("distributed_type", "NO")).split(".")[-1]
    plugin = AcceleratorState._shared_state.get("deepspeed_plugins")
    if kind == "DEEPSPEED" and plugin:  # the stage too: ZeRO-2 and ZeRO-3 differ in what is partitioned
        stage = next(iter(plugin.values())).zero_stage if isinstance(plugin, dict) else plugin.zero_stage
        kind += f"_ZERO{stage}"
    return kind


# -- FSDP2 ----------------------------------------------------------------------------------------------------------
_RESHARD_AFTER_FORWARD: dict[int, bool] = {}  # id(FSDP module) -> its configured reshard_after_forward


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
    if not fsdp_launch():
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


# -- DeepSpeed ------------------------------------------------------------------------------------------------------
# model -> the open GatheredParameters context (whole weights). Weak keys: a finished method's model, and with it
# its whole weights, is freed when the method is (the context holds the parameters, not the model).
_ZERO3_GATHERED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _zero3_params(model: Any) -> list[Any]:
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def _zero3_gather(model: Any) -> None:
    params = _zero3_params(model)
    if not params or model in _ZERO3_GATHERED:
        return
    import deepspeed

    for p in params:  # left over from the destroyed engine's last forward; partition() would refuse them
        p.ds_active_sub_modules.clear()
    gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    gathered.__enter__()  # every process all-gathers; exited by _zero3_shard
    _ZERO3_GATHERED[model] = gathered


def _zero3_shard(model: Any) -> None:
    gathered = _ZERO3_GATHERED.pop(model, None)
    if gathered is not None:
        # modifier_rank=None: every process keeps its partition as it was. Weights changed in place while whole
        # (a checkpoint loaded into them) would be lost: DeepSpeed 0.19 detects that and raises instead.
        gathered.__exit__(None, None, None)


def release_engine(accelerator: Any) -> None:
    """After a training under DeepSpeed: destroy its engine (``Accelerator.free_memory``), which removes the module
    hooks (ZeRO-3 all-gathers in them) and the gradient hooks of its optimizer, then the engine's own forward hooks,
    which ``destroy`` leaves on the model, and the parameters' links to the ZeRO-3 optimizer: they would keep the
    engine, and its optimizer's fp32 master weights and moments, alive as long as the model. The model stays
    partitioned under ZeRO-3 until ``gather_weights``; the next task's engine hooks it again. A no-op for other
    launches."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        return
    engine = wrapped.engine
    accelerator.free_memory()
    for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()
            setattr(engine, name, None)
    engine.optimizer = None
    for param in engine.module.parameters():  # ZeRO-3 points every parameter at its optimizer (the next one again)
        if hasattr(param, "_z3_optimizer"):
            del param._z3_optimizer


def deepspeed_prepare(model: Any, optimizer: Any, micro_batch: int, max_grad_norm: float) -> tuple[Any, Any]:
    """Under a DeepSpeed launch: ``(accelerator, engine)`` from ``accelerator.prepare(model, optimizer)`` for a
    hand-written loop (``engine.backward``, ``engine.step``); ``(None, None)`` otherwise. ``micro_batch`` is the
    number of sequences one process backpropagates per step (DeepSpeed requires it); the clipping norm replaces the
    config file's. The learning-rate schedule stays the caller's: it steps the base optimizer's param groups, which
    DeepSpeed's ZeRO optimizer uses."""
    if not deepspeed_launch():
        return None, None
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # A fresh plugin from the launch's config (a Trainer may have filled the shared one with its own batch size);
    # the process group (gloo on CPU, see harness.distributed.state) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator()
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = micro_batch
    ds_config["gradient_clipping"] = max_grad_norm
    # One optimizer step per ``engine.step()``, as the caller's schedule assumes (a config's accumulation would
    # scale the loss down and skip steps); the caller batches its own rollouts.
    ds_config["gradient_accumulation_steps"] = 1
    engine, _ = accelerator.prepare(model, optimizer)
    return accelerator, engine


def zero3(engine: Any) -> bool:
    return engine is not None and engine.zero_optimization_stage() == 3


@contextmanager
def whole_weights(model: Any, engine: Any = None) -> Iterator[None]:
    """Within a training: whole weights inside the block, so forwards there make no collectives (processes may run
    different numbers of them: rollouts of different lengths), and the training's sharding again after it.
    FSDP2: ``gather_weights``/``shard_weights``. ZeRO-3 (``engine`` alive): gather and remove the engine's hooks,
    then restore both, as TRL's ``unwrap_model_for_generation`` does. Every process must enter it."""
    if zero3(engine):
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(_zero3_params(model)):
            remove_hooks(engine)
            try:
                yield
            finally:
                add_hooks(engine)
        return
    gather_weights(model)
    try:
        yield
    finally:
        shard_weights(model)


# -- the two calls the methods make ---------------------------------------------------------------------------------
_HELD: list[float] = []  # the fraction ``gather_weights`` found on this process last, for the sync log only


def held_fraction(model: Any) -> float:
    """The share of the model's parameter elements this process owns now: 1.0 when whole (DDP, ZeRO-2, gathered),
    about 1/N while FSDP2 or ZeRO-3 shard them over N processes (ZeRO-3: the size of its partitions, although
    small "persistent" parameters stay gathered in memory too)."""
    from torch.distributed.tensor import DTensor

    held = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_id"):  # ZeRO-3: this process's partition (``ds_tensor``) of ``ds_numel`` elements
            held, full = held + p.ds_tensor.numel(), full + p.ds_numel
        elif isinstance(p, DTensor):  # FSDP2: the local shard
            held, full = held + p.to_local().numel(), full + p.numel()
        else:
            held, full = held + p.numel(), full + p.numel()
    return held / max(full, 1)


def take_held_fraction() -> float | None:
    """What the last ``gather_weights`` found before gathering (``held_fraction``), once; None if none since."""
    return _HELD.pop() if _HELD else None


def gather_weights(model: Any) -> None:
    """After training: every process all-gathers the FSDP2-sharded parameters and keeps them whole, so
    ``model.parameters()`` are the plain full tensors (identical everywhere) and forwards make no collectives.
    Likewise the ZeRO-3-partitioned ones, once ``release_engine`` removed the engine's hooks. Records how much of
    the model this process owned before (``take_held_fraction``: that the training was really sharded)."""
    if os.environ.get(SYNC_LOG_ENV):  # only the sync log reads it; not worth a pass over the weights otherwise
        _HELD[:] = [held_fraction(model)]
    _fsdp_gather(model)
    _zero3_gather(model)


def shard_weights(model: Any) -> None:
    """Before training again: undo ``gather_weights`` (optimizers must be built on the shards)."""
    _fsdp_shard(model)
    _zero3_shard(model)
