"""Worker for tests/test_distributed_methods.py, run under a 2-process launch (and alone): trains every RL and
MemGen trainer for two steps on a task whose reward varies on random text, then writes this process's digests of
the trainable weights before and after each training, and the loss curves, to ``<out>/rank<r>.json``.

Every trainer also runs ``check_in_sync`` itself (it raises if the processes' weights differ); the digests let the
test check the positive side too: the weights did change, and identically on every process."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from harness.config import RunConfig, apply_overrides
from harness.distributed import weights_digest, world
from harness.models import load_model
from tasks.base import Example
from tasks.registry import get_task


class LetterReward:
    """The ``arith`` task, scored by the fraction of ASCII letters in the completion (varies on random text)."""

    def __init__(self) -> None:
        self.inner = get_task("arith")
        self.name, self.version, self.max_new_tokens = "letters", "1", 6

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def score(self, completion: str, example: Example) -> float:
        return sum(c.isascii() and c.isalpha() for c in completion) / max(len(completion), 1)


def trainable(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def main(out: Path) -> None:
    rank, n_proc = world()
    task = LetterReward()
    examples = task.load("train", limit=8, seed=0)
    cfg = apply_overrides(RunConfig(), ["model=tiny-random", "train.max_steps=2", "train.batch_size=4",
                                        "train.lr=0.01", "eval.max_new_tokens=6"])
    digests: dict[str, list[str]] = {}
    losses: dict[str, list[float]] = {}

    def record(label: str, params: list, train) -> None:
        before = weights_digest(params)
        stats = train()
        digests[label] = [before, weights_digest(params)]
        losses[label] = [float(x) for x in stats.get("losses", [])]

    from baselines.grpo import GRPO
    from baselines.reinforce_pp import ReinforcePP

    rpp = ReinforcePP(load_model("tiny-random"), cfg, {"samples_per_prompt": 2, "prompts_per_step": 2,
                                                       "max_completion_length": 6, "variant": "baseline"})
    record("reinforce_pp", trainable(rpp.model), lambda: rpp.train_on_task(task, examples, 1))
    grpo = GRPO(load_model("tiny-random"), cfg, {"num_generations": 2, "prompts_per_step": 2,
                                                 "max_completion_length": 6})
    record("grpo", trainable(grpo.model), lambda: grpo.train_on_task(task, examples, 1))

    from harness.memgen.grpo import schedule_from_config, train_weaver_grpo
    from harness.memgen.options import MemGenOptions
    from harness.memgen.sft import SFTSchedule, train_weaver
    from harness.memgen.trigger import TriggerSchedule, train_trigger
    from harness.memgen.trigger_lm import TriggerLM
    from harness.memgen.weaver import MemGenModel
    from harness.training import tokenize_prompt_target

    torch.manual_seed(0)
    mm = MemGenModel(load_model("tiny-random"), MemGenOptions(k_prompt=2, k_infer=2, max_insertions=3, lora_r=4,
                                                                   lora_dropout=0.0))  # deterministic SFT
    is_delim = torch.ones(mm.lm_head.weight.shape[0], dtype=torch.bool)  # every token: insertions happen
    rows = []
    for e in examples:
        r = tokenize_prompt_target(mm.tokenizer, task.prompt(e, mm.tokenizer), e.target, 256)
        rows.append((r["input_ids"][: r["prompt_len"]], r["input_ids"][r["prompt_len"]:]))
    sft = SFTSchedule(steps=2, batch_size=3, lr=0.01, warmup_ratio=0.0, scheduler="constant", max_grad_norm=1.0,
                      weight_decay=0.0, seed=0)  # 3 rows over 2 processes: uneven shards
    record("memgen weaver sft", mm.weaver_parameters(), lambda: train_weaver(mm, rows, is_delim, 2, sft))
    sch = schedule_from_config(cfg, 0, len(examples), 6, group=2, prompts_per_step=2, lr=0.01)
    record("memgen weaver grpo", mm.weaver_parameters(),
           lambda: train_weaver_grpo(mm, task, examples, is_delim, sch))
    with torch.random.fork_rng():
        torch.manual_seed(1)
        trigger = TriggerLM(mm)
    tsch = TriggerSchedule(steps=2, prompts_per_step=1, group=4, lr=0.05, max_new_tokens=6, lam=1.0)
    record("memgen trigger", trigger.parameters_to_train(),
           lambda: train_trigger(mm, trigger, task, examples, is_delim, tsch))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"world": n_proc, "digests": digests, "losses": losses},
                                                            indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
