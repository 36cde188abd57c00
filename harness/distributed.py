"""Data-parallel helpers over ``accelerate``'s process state (a no-op in a single process).

Under ``accelerate launch --num_processes N`` every process runs the same runner: evaluation prompts are sharded
round-robin, the per-sample records are gathered to every process in the original order (so each sample is
scored exactly once, whatever N), and only the main process writes files. Training is data-parallel too (see
``rank_slice`` below): ``sft`` and ``grpo`` through their Trainer's DDP, ``reinforce_pp`` through DDP from
``accelerate`` (``ddp_model``), and MemGen's weaver SFT, weaver GRPO and trigger training by summing the
trainable gradients by hand (``all_reduce_grads``); every method checks after each task that its trainable weights
are bit-identical on all processes (``check_in_sync``).

Verified here: every method under 2 CPU processes with gloo (``tests/test_distributed*.py``), and sft, grpo and
reinforce_pp under FSDP2 and DeepSpeed ZeRO-2/3 (``harness/sharded.py``, which also holds the CPU work-arounds
``state`` applies for them). FSDP1 is refused. Not verified here (no GPU): NCCL. The hand-summed MemGen gradients
assume plain data parallelism (full parameters on every process): memgen never shards, whatever the launch.

On CPU, accelerate 1.x's ``accelerate launch --cpu --num_processes N`` starts ONE process unless given an MPI
hostfile; ``memgen-bench run --num-processes N`` therefore launches with ``--multi_gpu`` (torchrun) and
``ACCELERATE_USE_CPU=true``, which gives N gloo processes, and ``run`` refuses the single-process trap with an
error saying so (``single_process_cpu_launch``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")


WORLD_SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # torchrun, then MPI


def launched() -> bool:
    """True inside ``accelerate launch`` / torchrun / mpirun with more than one process."""
    return max(int(os.environ.get(k, "1") or 1) for k in WORLD_SIZE_ENV) > 1


def single_process_cpu_launch() -> bool:
    """True in the one process that ``accelerate launch --cpu --num_processes N`` (N > 1, no MPI hostfile) starts:
    accelerate's simple launcher sets the rendezvous address but starts a single process (accelerate 1.x)."""
    return (os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ
            and not launched())


def _use_cpu() -> bool:
    """CPU processes (gloo): ``ACCELERATE_USE_CPU`` set by the launcher, or no GPU at all."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    import torch

    return not torch.cuda.is_available()


@cache
def state():
    from accelerate import PartialState

    from harness.sharded import check_supported, deepspeed_on_cpu, fsdp_on_cpu, honour_fsdp_on_cpu

    if launched():
        check_supported()  # FSDP1 / zero3_init_flag: a one-line error before any work
    if deepspeed_on_cpu():
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
            from harness.config import ConfigError

            raise ConfigError("DeepSpeed on CPU: launch without ACCELERATE_USE_CPU (accelerate ignores DeepSpeed in "
                              "a CPU launch; see configs/accelerate/zero2_cpu.yaml)")
        # accelerate 1.15 only initialises DeepSpeed when not told cpu=True (AcceleratorState: ``... and not cpu``);
        # an explicit gloo backend makes it form the process group through deepspeed.comm on a CUDA-less machine.
        return PartialState(backend="gloo")
    if fsdp_on_cpu():
        honour_fsdp_on_cpu()
    # PartialState only forms a CPU (gloo) process group when told cpu=True; without it every CPU process of a
    # launch would believe it is alone (the Accelerator reads ACCELERATE_USE_CPU itself, PartialState does not).
    return PartialState(cpu=_use_cpu())


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside a launch, without initialising anything."""
    if not launched():
        return 0, 1
    s = state()
    return s.process_index, s.num_processes


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if launched():
        state().wait_for_everyone()


def shard_indices(n: int, rank: int, n_proc: int) -> list[int]:
    """Round-robin shard of range(n): every index in exactly one shard, sizes differ by at most one."""
    return list(range(rank, n, n_proc))


def merge_shards(shards: Sequence[Sequence[tuple[int, Any]]], n: int) -> list[Any]:
    """(index, value) pairs from every process -> values in index order; checks each index arrives once."""
    out: list[Any] = [None] * n
    seen = [False] * n
    for shard in shards:
        for i, v in shard:
            if seen[i]:
                raise RuntimeError(f"sample {i} was produced by two processes")
            out[i], seen[i] = v, True
    if not all(seen):
        raise RuntimeError(f"samples {[i for i, s in enumerate(seen) if not s][:5]} were produced by no process")
    return out


def map_sharded(fn: Callable[[list[T]], list[Any]], items: Sequence[T]) -> list[Any]:
    """Apply ``fn`` (a batch function) to this process's shard of ``items`` and gather results in order."""
    rank, n_proc = world()
    if n_proc == 1:
        return fn(list(items))
    from accelerate.utils import gather_object

    idx = shard_indices(len(items), rank, n_proc)
    local = fn([items[i] for i in idx]) if idx else []
    pairs = list(zip(idx, local, strict=True))
    gathered = gather_object([pairs])  # one list of pairs per process
    return merge_shards(gathered, len(items))


# -- data-parallel training ---------------------------------------------------------------------------------------
# Training under a launch: every process draws the same global batch (same seeds), takes its ``rank_slice`` of the
# rows, scales its loss by (its share of the global normaliser: rows or tokens) so the losses of all processes SUM
# to the single-process loss, and sums the gradients with ``all_reduce_grads`` (or averages them through DDP with
# the loss also multiplied by the number of processes). Every process then holds the same gradient, clips it the
# same way and takes the same optimizer step, so the trainable weights stay bit-identical (``check_in_sync``).
# Collectives are only ever called after a process's generation has finished, the same number of times on every
# process, so processes whose rollouts end at different decoding steps simply wait at the next collective.


def rank_slice(n: int) -> range:
    """This process's contiguous block of a global batch of ``n`` rows (block sizes differ by at most one)."""
    rank, n_proc = world()
    return range(rank * n // n_proc, (rank + 1) * n // n_proc)


def rank_seed(seed: int) -> int:
    """``seed`` in a single process; a distinct seed per process under a launch, so that processes sampling
    rollouts of the same prompt do not draw identical samples."""
    rank, n_proc = world()
    if n_proc == 1:
        return seed
    from harness.seeding import derive_seed

    return derive_seed(seed, "rank", rank)


def gather_rows(indices: Sequence[int], values: Sequence[Any], n: int) -> list[Any]:
    """Every process's ``values`` (for its row ``indices``) gathered into the full list of ``n`` rows, in order,
    on every process; checks that each row comes from exactly one process."""
    pairs = list(zip(indices, values, strict=True))
    if world()[1] == 1:
        return merge_shards([pairs], n)
    from accelerate.utils import gather_object

    return merge_shards(gather_object([pairs]), n)


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over the processes (the values themselves in a single process)."""
    if not launched():
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def _comm_device():
    """Where collectives' tensors live: the process's GPU under NCCL, else the CPU (gloo)."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_grads(params: Sequence[Any]) -> bool:
    """Sum the gradients of ``params`` over the processes, in place; True if any process had a gradient.

    A parameter without a gradient counts as zeros (a process whose share of the batch produced no loss still
    takes part). When no process had any gradient the gradients stay None, so every process skips the step alike.
    In a single process this only reports whether any gradient exists. Losses must be scaled so that their sum
    over the processes is the global loss (see the comment above ``rank_slice``)."""
    params = list(params)
    has = any(p.grad is not None for p in params)
    if not launched():
        return has
    import torch
    import torch.distributed as dist

    device = _comm_device()
    flat = torch.cat([*(p.grad.detach().reshape(-1).to(device, torch.float32) if p.grad is not None
                        else torch.zeros(p.numel(), dtype=torch.float32, device=device) for p in params),
                      torch.tensor([float(has)], device=device)])  # (sum of numel + 1,)
    dist.all_reduce(flat)
    if flat[-1].item() == 0:
        return False
    offset = 0
    for p in params:
        g = flat[offset: offset + p.numel()].view_as(p).to(p.device, p.dtype)
        offset += p.numel()
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
    return True


def weights_digest(params: Sequence[Any]) -> str:
    """A SHA-256 of the exact bytes of ``params`` (in order)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for p in params:
        # A copy: ``.numpy()`` makes a tensor's storage non-resizable, and FSDP2 frees unsharded storage by resizing
        h.update(p.detach().cpu().clone().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


SYNC_LOG_ENV = "MEMGEN_BENCH_SYNC_LOG"


def check_in_sync(params: Sequence[Any], label: str) -> str:
    """Raise if the trainable ``params`` differ between processes (they must be bit-identical after
    data-parallel training); returns this process's digest. With ``$MEMGEN_BENCH_SYNC_LOG`` set, every process
    also appends ``{"label", "rank", "world", "digest", "sharding", "held"}`` as a JSON line to
    ``<that path>.rank<r>`` (the tests read it; ``label`` starts with the method's name; ``held``: the share of the
    model the process held when training ended, ``harness.sharded.take_held_fraction``, None for methods that
    never shard). In a single process without the log it does nothing and returns ""."""
    rank, n_proc = world()
    path = os.environ.get(SYNC_LOG_ENV)
    if n_proc == 1 and not path:
        return ""  # nothing to compare with (and no need to hash a large model)
    digest = weights_digest(params)
    if path:
        import json

        from harness.sharded import sharding, take_held_fraction

        with open(f"{path}.rank{rank}", "a") as f:
            f.write(json.dumps({"label": label, "rank": rank, "world": n_proc, "digest": digest,
                                "sharding": sharding(label.split()[0]), "held": take_held_fraction()}) + "\n")
    if n_proc > 1:
        from accelerate.utils import gather_object

        digests = gather_object([digest])
        if len(set(digests)) != 1:
            raise RuntimeError(f"{label}: trainable weights differ between processes after training "
                               f"({', '.join(d[:12] for d in digests)}); data-parallel training went out of sync")
    return digest


_DDP: dict[int, Any] = {}


def ddp_model(model: Any) -> Any:
    """``model`` wrapped for data-parallel training by ``accelerate`` (DDP under a launch; the model itself in a
    single process). Wrapped once per model object and reused, so repeated tasks do not stack DDP hooks.

    DDP averages gradients over the processes during ``backward``; ``generate``, reference forwards and
    checkpoints keep using ``model`` itself (it shares the parameters)."""
    from harness.sharded import fsdp_sharded

    if not launched() or fsdp_sharded(model):  # FSDP2 shards the model in place (``harness.sharded.fsdp_prepare``)
        return model
    if id(model) not in _DDP:
        from accelerate import Accelerator

        _DDP[id(model)] = Accelerator().prepare_model(model)
    return _DDP[id(model)]
