"""Seconds per step of our REINFORCE++ vs TRL's GRPOTrainer, interleaved step by step, plus both reward curves.

Both methods train their own copy of the same model on the same task with the same number of generations per step
and completion budget: GRPO samples ``--group`` completions of each of ``--prompts`` prompts, REINFORCE++ (its
default since issue 16, as OpenRLHF runs it) ``--rpp-samples`` (1) of each of group x prompts / rpp-samples
prompts; the KL (``rl.kl_coef``, ``--kl-coef``) is the same for both (0 by default). The REINFORCE++ step runs inside a callback at the end of every TRL step, so the two are
timed under the same machine load (this machine is shared and noisy) and the ratio comes from one run.

What one step contains: TRL GRPO (beta = 0) samples the group, scores it and does one forward/backward; our
REINFORCE++ samples, scores, does a no-grad forward for the old log-probs, one for the reference (skipped with
``--kl-coef 0``) and one forward/backward. Completions stop at EOS, so lengths differ: the mean lengths are printed
beside the times, and seconds per generated token too.

    python benchmarks/bench_rl.py --task choice --steps 30 --group 8 --prompts 1 --lr 5e-4 \
        --out results/benchmarks/rl_choice_30steps_1x8.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from baselines.grpo import GRPO
from baselines.reinforce_pp import ReinforcePP, prompt_batches
from harness.config import RLConfig, RunConfig, TrainConfig
from harness.memgen.weaver import _decoder
from harness.models import load_model
from harness.seeding import derive_seed
from tasks.registry import get_task


def call_counter(*models) -> list[int]:
    """A one-element counter of the forward calls of the models' transformer stacks (hooks; benchmark only). On this
    CPU a small forward costs mostly per call (bf16: 35 ms for one token, 66 ms for 8 rows x 8 tokens), so calls
    per step are the work measure that decoding and the woven replay follow."""
    n = [0]
    seen: set[int] = set()
    for model in models:
        dec = _decoder(model)
        if id(dec) not in seen:  # MemGen's shared base: the reasoner and the weaver are one stack
            seen.add(id(dec))
            dec.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    return n


class Interleave(TrainerCallback):
    """Times each TRL step, then runs and times one REINFORCE++ step before TRL's next one."""

    def __init__(self, rpp: ReinforcePP, task, examples, steps: int, budget: int, seed: int, memgen=None,
                 grpo_model=None):
        self.rpp, self.task, self.examples, self.budget = rpp, task, examples, budget
        # forward calls of each method's transformer stack(s) per step (see call_counter)
        self.counters = {"grpo": call_counter(grpo_model) if grpo_model is not None else [0],
                         "rpp": call_counter(rpp.model),
                         "memgen": call_counter(memgen[0].reasoner, memgen[0].weaver) if memgen else [0]}
        self.calls: dict[str, list[int]] = {k: [] for k in self.counters}
        self.optimizer, self.scheduler = rpp.optimizer(steps)
        import random

        self.batches = prompt_batches(len(examples), rpp.opts.prompts_per_step, random.Random(seed))
        self.memgen = memgen  # (MemGenModel, is_delim, WeaverGRPOSchedule, optimizer, scheduler, generator) or None
        self.mg_seconds: list[float] = []
        self.mg_stats: list[dict] = []
        self.grpo_seconds: list[float] = []
        self.grpo_logs: list[dict] = []
        self.rpp_seconds: list[float] = []
        self.rpp_stats: list[dict] = []
        self._t0 = 0.0

    def _count(self, name: str) -> None:
        self.calls[name].append(self.counters[name][0])
        self.counters[name][0] = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.counters["grpo"][0] = 0
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.grpo_seconds.append(time.perf_counter() - self._t0)
        self._count("grpo")
        self.counters["rpp"][0] = 0
        batch = [self.examples[i] for i in next(self.batches)]
        t0 = time.perf_counter()
        stats = self.rpp.train_step(self.task, batch, self.optimizer, self.scheduler, self.budget)
        self.rpp_seconds.append(time.perf_counter() - t0)
        self._count("rpp")
        self.rpp_stats.append(stats)
        print(f"step {len(self.rpp_seconds):3d}  reinforce++ {self.rpp_seconds[-1]:6.2f}s reward {stats['reward']:.3f} "
              f"len {stats['length']:.1f}", flush=True)
        if self.memgen is not None:
            from harness.memgen.grpo import weaver_grpo_step

            mm, is_delim, sch, opt, sched, gen = self.memgen
            tok = mm.tokenizer
            # GRPO's shape: prompts_per_step prompts x group rollouts (REINFORCE++'s batch has group x as many
            # prompts; handing it all over made the weaver decode 8x the others' rollouts)
            mg_batch = batch[: sch.prompts_per_step]
            ids = [tok(self.task.prompt(e, tok), add_special_tokens=False).input_ids for e in mg_batch]
            self.counters["memgen"][0] = 0
            t0 = time.perf_counter()
            st = weaver_grpo_step(mm, self.task, mg_batch, ids, is_delim, sch, opt, sched, gen)
            self.mg_seconds.append(time.perf_counter() - t0)
            self._count("memgen")
            self.mg_stats.append(st)
            print(f"step {len(self.mg_seconds):3d}  memgen grpo {self.mg_seconds[-1]:6.2f}s reward {st['reward']:.3f} "
                  f"len {st['length']:.1f} insertions {st['insertions']:.1f}", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.grpo_logs.append(dict(logs))
            print(f"step {len(self.grpo_logs):3d}  trl grpo    {self.grpo_seconds[-1]:6.2f}s reward "
                  f"{float(logs['reward']):.3f} len {float(logs['completions/mean_length']):.1f}", flush=True)


def plot_rewards(curves: dict[str, list[float]], path: Path, title: str) -> None:
    """Per-step mean reward of each method with a 5-step moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
    for name, ys in curves.items():
        if not ys:
            continue
        x = np.arange(1, len(ys) + 1)
        line, = ax.plot(x, ys, alpha=0.35, lw=1)
        w = min(5, len(ys))
        ax.plot(x[w - 1:], np.convolve(ys, np.ones(w) / w, mode="valid"), color=line.get_color(), lw=2,
                label=f"{name} ({w}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of the step's rollouts")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def halves(xs: list[float]) -> tuple[float, float]:
    h = len(xs) // 2
    return statistics.fmean(xs[:h]), statistics.fmean(xs[h:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="choice")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=1, help="prompts per step")
    ap.add_argument("--max-completion", type=int, default=0, help="0 = the task's budget")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--rpp-samples", type=int, default=1, help="REINFORCE++ samples per prompt (its prompts per "
                    "step: group x prompts / rpp-samples, the same generations per step as GRPO)")
    ap.add_argument("--kl-coef", type=float, default=0.0, help="rl.kl_coef for both methods")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", help="fp32, bf16 or auto (the run's default: bf16 on a native-bf16 CPU)")
    ap.add_argument("--memgen", action="store_true", help="also time MemGen weaver GRPO (untrained weaver)")
    ap.add_argument("--out", type=Path, default=None, help="write the per-step figures as JSON here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    task = get_task(a.task)
    budget = a.max_completion or task.max_new_tokens
    n_gen = a.group * a.prompts  # generations per step, the same for both
    if n_gen % a.rpp_samples:
        ap.error(f"--rpp-samples {a.rpp_samples} must divide group x prompts = {n_gen}")
    rpp_prompts = n_gen // a.rpp_samples
    cfg = RunConfig(model=a.model, seed=a.seed, dtype=a.dtype, rl=RLConfig(kl_coef=a.kl_coef),
                    train=TrainConfig(max_steps=a.steps, lr=a.lr, warmup_ratio=0.0, scheduler="constant"))
    examples = task.load("train", limit=max(64, a.steps * max(a.prompts, rpp_prompts)), seed=a.seed)
    grpo = GRPO(load_model(a.model, a.dtype), cfg, {"num_generations": a.group, "prompts_per_step": a.prompts,
                                           "max_completion_length": budget})
    rpp = ReinforcePP(load_model(a.model, a.dtype), cfg, {"samples_per_prompt": a.rpp_samples, "prompts_per_step": rpp_prompts,
                                                 "max_completion_length": budget})
    memgen = None
    if a.memgen:
        from harness.memgen.generation import delimiter_mask
        from harness.memgen.grpo import WeaverGRPOSchedule, weaver_optimizer
        from harness.memgen.options import MemGenOptions
        from harness.memgen.weaver import MemGenModel

        mm = MemGenModel(load_model(a.model, a.dtype), MemGenOptions())
        sch = WeaverGRPOSchedule(steps=a.steps, prompts_per_step=a.prompts, group=a.group, lr=a.lr, warmup_ratio=0.0,
                                 scheduler="constant", max_grad_norm=1.0, weight_decay=0.0, seed=a.seed,
                                 max_new_tokens=budget)
        opt, sched = weaver_optimizer(mm, sch)
        is_delim = delimiter_mask(mm.tokenizer, mm.opts.delimiters, mm.lm_head.weight.shape[0])
        memgen = (mm, is_delim, sch, opt, sched, torch.Generator().manual_seed(a.seed))
    hook = Interleave(rpp, task, examples, a.steps, budget, derive_seed(a.seed, "bench-rpp"), memgen, grpo.model)
    grpo.callbacks.append(hook)
    grpo.train_on_task(task, examples, stage=1)

    g_sec, r_sec = hook.grpo_seconds, hook.rpp_seconds
    g_rew = [float(x["reward"]) for x in hook.grpo_logs]
    r_rew = [s["reward"] for s in hook.rpp_stats]
    g_len = statistics.fmean(float(x["completions/mean_length"]) for x in hook.grpo_logs)
    r_len = statistics.fmean(s["length"] for s in hook.rpp_stats)
    # the first step of each includes one-off warm-up (allocations, TRL set-up): report the median and the mean
    # of steps 2.. so it does not dominate
    g_mean, r_mean = statistics.fmean(g_sec[1:]), statistics.fmean(r_sec[1:])
    n_tok = a.group * a.prompts
    print(f"\nmodel {a.model}, task {a.task}, GRPO {a.prompts} prompt(s) x {a.group}, REINFORCE++ {rpp_prompts} "
          f"prompt(s) x {a.rpp_samples}, budget {budget} tokens, {a.steps} steps, lr {a.lr}, rl.kl_coef {a.kl_coef}, "
          f"threads {torch.get_num_threads()}, dtype {a.dtype}")
    print(f"TRL GRPOTrainer : {g_mean:6.2f} s/step (median {statistics.median(g_sec):.2f}), mean length "
          f"{g_len:.1f}, {g_mean / (g_len * n_tok):.4f} s per generated token")
    print(f"our REINFORCE++ : {r_mean:6.2f} s/step (median {statistics.median(r_sec):.2f}), mean length "
          f"{r_len:.1f}, {r_mean / (r_len * n_tok):.4f} s per generated token")
    if hook.mg_seconds:
        m_mean = statistics.fmean(hook.mg_seconds[1:] or hook.mg_seconds)
        m_len = statistics.fmean(s["length"] for s in hook.mg_stats)
        print(f"MemGen weaver GRPO: {m_mean:6.2f} s/step (median {statistics.median(hook.mg_seconds):.2f}), mean "
              f"length {m_len:.1f}, {m_mean / (m_len * n_tok):.4f} s per generated token; ratio to TRL GRPO "
              f"{m_mean / g_mean:.2f} per step, {(m_mean / m_len) / (g_mean / g_len):.2f} per generated token")
    trl_own = [float(x["step_time"]) for x in hook.grpo_logs if "step_time" in x]
    if trl_own:
        print(f"(TRL's own step_time log, steps 2..: {statistics.fmean(trl_own[1:] or trl_own):.2f} s/step)")
    print(f"ratio REINFORCE++ / TRL GRPO: {r_mean / g_mean:.2f} per step, "
          f"{(r_mean / r_len) / (g_mean / g_len):.2f} per generated token")
    calls = {k: statistics.fmean(v) for k, v in hook.calls.items() if v}
    print("transformer forward calls per step (generation + loss; backward not counted): "
          + ", ".join(f"{k} {v:.1f}" for k, v in calls.items())
          + (f"; ratio MemGen / TRL GRPO {calls['memgen'] / calls['grpo']:.2f}" if "memgen" in calls else ""))
    gh, rh = halves(g_rew), halves(r_rew)
    print(f"mean reward, first half -> second half: GRPO {gh[0]:.3f} -> {gh[1]:.3f}; "
          f"REINFORCE++ {rh[0]:.3f} -> {rh[1]:.3f}")
    thirds = [(i * len(g_rew) // 3, (i + 1) * len(g_rew) // 3) for i in range(3)]
    print("mean reward by thirds of the steps: GRPO " + " / ".join(f"{statistics.fmean(g_rew[i:j]):.3f}" for i, j in
                                                                   thirds)
          + "; REINFORCE++ " + " / ".join(f"{statistics.fmean(r_rew[i:j]):.3f}" for i, j in thirds))
    print(f"REINFORCE++ steps whitened (rewards not all tied): {sum(s['whitened'] for s in hook.rpp_stats):.0f} of "
          f"{len(hook.rpp_stats)}")
    print("GRPO rewards       :", " ".join(f"{x:.2f}" for x in g_rew))
    print("REINFORCE++ rewards:", " ".join(f"{x:.2f}" for x in r_rew))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "grpo_seconds": g_sec,
                                     "rpp_seconds": r_sec, "grpo_rewards": g_rew, "rpp_rewards": r_rew,
                                     "grpo_logs": hook.grpo_logs, "rpp_stats": hook.rpp_stats,
                                     "memgen_seconds": hook.mg_seconds, "memgen_stats": hook.mg_stats,
                                     "forward_calls": hook.calls}, indent=1))
        plot_rewards({"TRL GRPO": g_rew, "REINFORCE++": r_rew, "MemGen weaver GRPO": [s["reward"] for s in
                                                                                     hook.mg_stats]},
                     a.out.with_suffix(".png"), f"{a.model} on {a.task}: {n_gen} generations per step (GRPO "
                     f"{a.prompts} x {a.group}, REINFORCE++ {rpp_prompts} x {a.rpp_samples}), lr {a.lr}")


if __name__ == "__main__":
    main()
