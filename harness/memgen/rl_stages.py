"""The ``memgen`` method's RL stages per task: weaver GRPO and trigger training, with schedules from the config.

Kept apart from ``method.py`` (which wires them into ``train_on_task``): each builds its schedule the way the
weaver's SFT stage does (steps from ``train.max_steps`` or epochs, ``train.*`` optimiser settings), with the
``memgen`` options ``grpo_*`` and ``trigger_*`` on top, and a seed derived from (master seed, stage).
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from harness.memgen.grpo import schedule_from_config, train_weaver_grpo
from harness.memgen.trigger import TriggerSchedule, train_trigger
from harness.memgen.trigger_lm import TriggerHead, TriggerLM
from harness.memgen.weaver import MemGenModel
from harness.seeding import derive_seed
from tasks.base import Example, Task

if TYPE_CHECKING:
    from harness.memgen.method import MemGen


def build_trigger(mm: MemGenModel, seed: int) -> TriggerHead | TriggerLM | None:
    """The trigger the options ask for (None with ``trigger=always``), initialised from ``seed`` without touching
    the global RNG stream."""
    opts = mm.opts
    if opts.trigger != "trained":
        return None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if opts.trigger_model == "lora":
            return TriggerLM(mm)
        # fp32 whatever the model dtype (TriggerHead casts its input): bf16 weights would not move at small lr.
        return TriggerHead(mm.lm_head.weight.shape[1]).to(device=mm.embed.weight.device, dtype=torch.float32)


def phase_hook(method: Any, phase: str) -> Callable[..., None] | None:
    """The runner's progress hook (``method.on_step``) with MemGen's training phase named; None without one."""
    hook = getattr(method, "on_step", None)
    return None if hook is None else functools.partial(hook, phase=phase)


def _budget(method: MemGen, task: Task) -> int:
    return method.cfg.eval.max_new_tokens or task.max_new_tokens


def _steps(method: MemGen, n_examples: int, prompts_per_step: int, override: int) -> int:
    t = method.cfg.train
    return override or t.max_steps or max(1, round(t.epochs * n_examples / prompts_per_step))


def train_grpo_stage(method: MemGen, task: Task, examples: Sequence[Example], stage: int) -> dict[str, Any]:
    """Weaver GRPO on ``task`` (reasoner frozen); loss, mean-reward and insertion curves."""
    o = method.opts
    seed = derive_seed(method.cfg.seed, "memgen-grpo", stage)
    sch = schedule_from_config(method.cfg, seed, len(examples), _budget(method, task), group=o.grpo_group,
                               prompts_per_step=o.grpo_prompts_per_step, lr=o.grpo_lr or o.lr)
    sch = dataclasses.replace(sch, steps=_steps(method, len(examples), o.grpo_prompts_per_step, o.grpo_steps),
                              temperature=o.grpo_temperature, aggregation=o.grpo_aggregation, scale=o.grpo_scale)
    return train_weaver_grpo(method.mm, task, examples, method.is_delim, sch,
                             label=f"memgen weaver grpo on {task.name}", on_step=phase_hook(method, "weaver-grpo"))


def train_trigger_stage(method: MemGen, task: Task, examples: Sequence[Example], stage: int) -> dict[str, Any]:
    """Trigger policy gradient on ``task`` with the weaver and the reasoner frozen; loss, reward, insertion rate."""
    o, t = method.opts, method.cfg.train
    assert method.trigger is not None
    sch = TriggerSchedule(steps=_steps(method, len(examples), o.trigger_prompts_per_step, o.trigger_steps),
                          prompts_per_step=o.trigger_prompts_per_step, group=o.trigger_group,
                          lr=o.trigger_lr or t.lr, max_grad_norm=t.max_grad_norm, weight_decay=t.weight_decay,
                          seed=derive_seed(method.cfg.seed, "memgen-trigger", stage),
                          max_new_tokens=_budget(method, task), lam=o.trigger_lam, scale=o.trigger_scale,
                          aggregation=o.trigger_aggregation, rate=o.trigger_rate, trigger_prompt=o.trigger_prompt)
    if o.trigger_train_fraction < 1.0:  # a seeded subset of the train split (the public code: a random third)
        n = max(1, round(o.trigger_train_fraction * len(examples)))
        pick = sorted(random.Random(derive_seed(method.cfg.seed, "memgen-trigger-subset", stage)).sample(
            range(len(examples)), n))
        examples = [examples[i] for i in pick]
    stats = train_trigger(method.mm, method.trigger, task, examples, method.is_delim, sch,
                          label=f"memgen trigger on {task.name}", on_step=phase_hook(method, "trigger"))
    return {"model": o.trigger_model, "examples": len(examples), **stats}
