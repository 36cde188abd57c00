"""The weights a sharded launch (FSDP2, DeepSpeed ZeRO-2/3) trains, next to those of a plain DDP launch.

Runs the same tiny sequence once per accelerate config with N processes and prints, per method and stage, how far
each sharded run's saved adapter is from the DDP run's: max |difference| and the L2 norm of the difference relative
to the L2 norm of the adapter's change from its initialisation (LoRA B starts at zero, so B alone is that change).
RL methods need non-zero rewards for the comparison to mean anything; the defaults pick SmolLM2 on ``choice``,
where about one rollout in eight is rewarded. On CPU (gloo) as below; on GPUs pass ``--configs ddp,fsdp,zero2,
zero3`` (the GPU files of configs/accelerate) and ``--model`` of your choice.

    python benchmarks/sharded_vs_ddp.py --out results/benchmarks/sharded_vs_ddp.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# config name -> (accelerate config file or None for DDP, extra environment)
CPU_CONFIGS = {
    "ddp": (None, {"ACCELERATE_USE_CPU": "true"}),
    "fsdp_cpu": ("fsdp_cpu.yaml", {"ACCELERATE_USE_CPU": "true"}),
    "zero2_cpu": ("zero2_cpu.yaml", {"DS_ACCELERATOR": "cpu"}),
    "zero3_cpu": ("zero3_cpu.yaml", {"DS_ACCELERATOR": "cpu"}),
}


def launch(config: str, args: list[str], out: Path, n: int) -> float:
    file, extra = CPU_CONFIGS.get(config, (f"{config}.yaml", {}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_USE_")}
    env.update({"OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"), **extra})
    head = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0", "--num_processes", str(n)]
    head += ["--multi_gpu"] if file is None else ["--config_file", str(ROOT / "configs" / "accelerate" / file)]
    t0 = time.perf_counter()
    res = subprocess.run([*head, "-m", "harness.cli", *args, "--out", str(out)], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{config} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def compare(a: Path, b: Path) -> dict[str, float]:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    b_keys = [k for k in wa if "lora_B" in k]
    num = sum(float((wa[k] - wb[k]).norm() ** 2) for k in b_keys) ** 0.5
    den = sum(float(wb[k].norm() ** 2) for k in b_keys) ** 0.5
    return {"max_abs_diff": diff, "lora_B_rel_l2_diff": num / den if den else float("nan"), "lora_B_norm": den}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="ddp,fsdp_cpu,zero2_cpu,zero3_cpu", help="first one is the reference")
    ap.add_argument("--methods", default="sft,grpo,reinforce_pp")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sequence", default="choice")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--work", default="/tmp/sharded_vs_ddp")
    ap.add_argument("--out", default=None, help="JSON with every figure")
    a = ap.parse_args()
    group = 8
    args = ["run", "--model", a.model, "--sequence", a.sequence, "--methods", a.methods,
            "--set", "eval.limit=2", "--set", "train.train_limit=32", "--set", f"train.max_steps={a.steps}",
            "--set", "train.lr=1e-3", "--set", "train.batch_size=4", "--set", "eval.max_new_tokens=8",
            "--set", f"method_options.grpo.num_generations={group}", "--set", "method_options.grpo.prompts_per_step=2",
            "--set", "method_options.grpo.max_completion_length=24",
            "--set", f"method_options.reinforce_pp.samples_per_prompt={group}",
            "--set", "method_options.reinforce_pp.prompts_per_step=2",
            "--set", "method_options.reinforce_pp.max_completion_length=24"]
    configs = a.configs.split(",")
    work = Path(a.work)
    seconds = {c: launch(c, args, work / c, a.processes) for c in configs}
    ref = configs[0]
    rows = []
    for method in a.methods.split(","):
        adapter = "weaver_adapter" if method == "memgen" else "adapter"
        stages = sorted(p.name for p in (work / ref / method / "checkpoints").glob("stage*"))
        for stage in stages:
            for c in configs[1:]:
                f = Path(method) / "checkpoints" / stage / adapter / "adapter_model.safetensors"
                row = {"method": method, "stage": stage, "config": c, "reference": ref,
                       **compare(work / c / f, work / ref / f)}
                train = work / ref / method / "train"
                rewards = [json.loads(p.read_text()).get("rewards") for p in sorted(train.glob("*.json"))]
                row["reference_rewards"] = rewards
                rows.append(row)
                print(f"{method:>12} {stage} {c:>10} vs {ref}: max|diff| {row['max_abs_diff']:.3g}  "
                      f"LoRA-B rel. L2 diff {row['lora_B_rel_l2_diff']:.3g}  (|B| {row['lora_B_norm']:.3g})")
    print("wall seconds per launch: " + ", ".join(f"{c} {s:.0f}" for c, s in seconds.items()))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"args": vars(a), "seconds": seconds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
