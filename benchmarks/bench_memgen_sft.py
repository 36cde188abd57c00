"""Weaver SFT step time and peak memory (SmolLM2-135M, batch 8), beside a LoRA SFT step on the same rows.

MemGen steps (latents after the prompt and at up to 5 delimiters of the gold target, K=8) and plain LoRA SFT
steps (the ``sft`` baseline's adapter: r=16 on q/k/v/o, loss on target tokens, the head on target positions
only as the baseline's collator does) are timed alternately on the same batches; the median of each is reported
with their ratio. A third variant feeds every prompt whole (before ``WovenState.feed_prompt`` fed the prompts'
common head, the system turn and the task's instruction, once per batch): the ratio of the two MemGen rows is what
that sharing saves. Peak memory: CUDA max allocated on a GPU; on CPU the
process's peak resident set (ru_maxrss) after the MemGen steps, before the SFT model is built.

    python benchmarks/bench_memgen_sft.py --steps 4
    python benchmarks/bench_memgen_sft.py --steps 4 --breakdown   # + where a weaver step's time goes
    python benchmarks/bench_memgen_sft.py --steps 4 --dtype bf16  # the default run's dtype on a native-bf16 CPU

Beside the time ratio it prints the ratio of token positions the two steps run forward and backward through (the
reasoner: prompt, latents and target; the weaver: what precedes the last insertion point plus K queries per
point; LoRA SFT: prompt and target): the work each step is defined to do. Where the forwards are compute-bound, as
on this CPU, the time ratio follows it (not exactly: per-token costs differ, e.g. the head runs on target positions
only); with short targets the latents and queries add as much as the weaver's copy of the prompt does.

``--breakdown`` times the phases of each MemGen step: the reasoner's chunk forwards (``WovenState.feed`` /
``feed_rows``), the weaver's forwards (``WovenState.weave`` / ``weave_rows``), the rest of the forward
(embedding, lm_head, cross-entropy), the backward and the optimizer step, as medians over the timed steps and
shares of the step.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import harness.memgen.weaver as weaver  # noqa: E402
from harness.config import TrainConfig  # noqa: E402
from harness.memgen.generation import delimiter_mask  # noqa: E402
from harness.memgen.options import MemGenOptions  # noqa: E402
from harness.memgen.sft import build_woven_batch, delimiter_points, sft_loss  # noqa: E402
from harness.memgen.weaver import MemGenModel, WovenState  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.training import lora_config, pad_right, tokenize_prompt_target, training_attention  # noqa: E402
from tasks.registry import get_task  # noqa: E402


def token_ratio(rows: list[dict], is_delim: torch.Tensor, opts: MemGenOptions, batch: int,
                share_head: bool) -> float:
    """Token positions of the weaver SFT steps over ``rows`` / those of LoRA SFT steps (see the module docstring).
    ``share_head``: each batch's common prompt head is fed once by the reasoner and read once by the weaver."""
    memgen = sft = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        prompts = [r["input_ids"][: r["prompt_len"]] for r in chunk]
        for r, p in zip(chunk, prompts, strict=True):
            target = r["input_ids"][r["prompt_len"] :]
            pts = delimiter_points(target, is_delim, opts.max_insertions)  # [0, inner points...]
            n_inner = len(pts) - 1
            reasoner = len(p) + len(target) + opts.k_prompt + n_inner * opts.k_infer
            woven = opts.k_prompt  # the prompt block's queries
            if n_inner:  # up to the last point: target tokens, the blocks before it, the inner blocks' queries
                woven += pts[-1] + opts.k_prompt + (n_inner - 1) * opts.k_infer + n_inner * opts.k_infer
            memgen += reasoner + len(p) + woven
            sft += len(p) + len(target)
        head = next((j for j, col in enumerate(zip(*prompts, strict=False)) if len(set(col)) > 1),
                    min(len(p) for p in prompts))
        if share_head and len(prompts) > 1 and head >= weaver.MIN_SHARED_PREFIX:
            memgen -= 2 * (len(prompts) - 1) * head  # the reasoner and the weaver each feed it once
    return memgen / sft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="arith")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", help="fp32, bf16 or auto (the default run's: bf16 on a native-bf16 CPU)")
    ap.add_argument("--breakdown", action="store_true", help="time the phases of each MemGen step")
    args = ap.parse_args()

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    tok = lm.tokenizer
    opts = MemGenOptions()
    mm = MemGenModel(lm, opts)
    is_delim = delimiter_mask(tok, opts.delimiters, mm.lm_head.weight.shape[0])
    task = get_task(args.task)
    rows = [tokenize_prompt_target(tok, task.prompt(e, tok), e.target, 512)
            for e in task.load("train", limit=args.batch * (args.steps + 1))]
    batches = [rows[i * args.batch : (i + 1) * args.batch] for i in range(args.steps + 1)]

    phases: dict[str, list[float]] = {}
    clock: dict[str, float] = {}
    if args.breakdown:  # wrap the chunk forwards of the woven replay with timers (benchmark only)
        inside: set[str] = set()  # a row-restricted call may fall back to the whole-batch one: time it once
        for name, kind in (("feed", "feed"), ("feed_rows", "feed"), ("weave", "weave"), ("weave_rows", "weave")):
            original = getattr(WovenState, name)

            def timed_call(self, *a, _f=original, _n=kind, **kw):
                if _n in inside:
                    return _f(self, *a, **kw)
                inside.add(_n)
                t0 = time.perf_counter()
                try:
                    out = _f(self, *a, **kw)
                finally:
                    inside.discard(_n)
                clock[_n] = clock.get(_n, 0.0) + time.perf_counter() - t0
                return out

            setattr(WovenState, name, timed_call)

    def memgen_step(b) -> None:
        clock.clear()
        t0 = time.perf_counter()
        prompts = [r["input_ids"][: r["prompt_len"]] for r in b]
        targets = [r["input_ids"][r["prompt_len"] :] for r in b]
        wb = build_woven_batch(prompts, targets, [delimiter_points(t, is_delim, opts.max_insertions) for t in targets],
                               opts.k_prompt, opts.k_infer, tok.pad_token_id, args.device)
        loss = sft_loss(mm, wb)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt_m.step()
        opt_m.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        feed, weave = clock.get("feed", 0.0), clock.get("weave", 0.0)
        for key, value in (("reasoner forward (feed)", feed), ("weaver forward (weave)", weave),
                           ("rest of forward", t1 - t0 - feed - weave), ("backward", t2 - t1),
                           ("optimizer", t3 - t2)):
            phases.setdefault(key, []).append(value)

    opt_m = torch.optim.AdamW(mm.weaver_parameters(), lr=1e-4)
    # As train_weaver: only the weaver's LoRA dropout trains (left on for SFT too), and in bf16 on CPU both models'
    # training forwards use eager attention (training_attention; a no-op in fp32).
    with mm.weaver_dropout(True), training_attention(mm.reasoner_lm, mm.peft):
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        memgen_step(batches[0])  # warm-up; also the memory peak of a MemGen step, before the SFT model exists
        memgen_step(batches[1])
        if args.device.startswith("cuda"):
            peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB CUDA max allocated"
        else:
            peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB process peak RSS"

        from peft import get_peft_model

        sft_model = get_peft_model(load_model(args.model, dtype=args.dtype, device=args.device).model, lora_config(TrainConfig()))
        sft_model.train()
        opt_s = torch.optim.AdamW([p for p in sft_model.parameters() if p.requires_grad], lr=1e-4)

        def sft_step(b) -> None:
            enc = {k: v.to(args.device) if torch.is_tensor(v) else v
                   for k, v in pad_right(b, tok.pad_token_id, trim_logits=True).items()}
            with training_attention(sft_model):
                sft_model(**enc).loss.backward()
            opt_s.step()
            opt_s.zero_grad(set_to_none=True)

        def memgen_step_whole_prompts(b) -> None:
            shared = weaver._common_prefix
            weaver._common_prefix = lambda ids, mask: 0
            try:
                memgen_step(b)
            finally:
                weaver._common_prefix = shared

        sft_step(batches[0])
        t_mem, t_sft, t_whole = [], [], []
        for i, b in enumerate(batches[1:]):  # alternate, so all see the same load on this shared machine
            order = [(memgen_step, t_mem), (sft_step, t_sft), (memgen_step_whole_prompts, t_whole)]
            for fn, out in order[i % 3:] + order[: i % 3]:
                t0 = time.perf_counter()
                fn(b)
                out.append(time.perf_counter() - t0)
    n_lat = [len(delimiter_points(r["input_ids"][r["prompt_len"]:], is_delim, opts.max_insertions)) for r in rows]
    print(f"memgen weaver SFT ({args.model}, batch {args.batch}, K={opts.k_prompt}, "
          f"mean latent blocks/row {sum(n_lat) / len(n_lat):.1f}): median {statistics.median(t_mem):.2f} s/step "
          f"{[round(t, 2) for t in t_mem]}; peak {peak}")
    print(f"LoRA SFT step on the same rows: median {statistics.median(t_sft):.2f} s/step {[round(t, 2) for t in t_sft]}")
    print(f"memgen, every prompt fed whole: median {statistics.median(t_whole):.2f} s/step "
          f"{[round(t, 2) for t in t_whole]}")
    print(f"ratio memgen/sft step time = {statistics.median(t_mem) / statistics.median(t_sft):.2f} "
          f"(prompts fed whole: {statistics.median(t_whole) / statistics.median(t_sft):.2f}; "
          f"shared head / whole = {statistics.median(t_mem) / statistics.median(t_whole):.2f})")
    timed_rows = [r for b in batches[1:] for r in b]
    print(f"token positions memgen/sft = {token_ratio(timed_rows, is_delim, opts, args.batch, True):.2f} "
          f"(prompts fed whole: {token_ratio(timed_rows, is_delim, opts, args.batch, False):.2f}): the work ratio")
    if args.breakdown:
        n = len(t_mem)
        total = sum(statistics.median(v[-n:]) for v in phases.values())
        for key, v in phases.items():
            med = statistics.median(v[-n:])
            print(f"  {key:<24} {med:6.2f} s  {100 * med / total:5.1f}%")


if __name__ == "__main__":
    main()
