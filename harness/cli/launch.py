"""Re-launching a CLI command under ``accelerate launch`` (``run --num-processes``, local multi-process sweeps)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from harness.cli.common import console


def _launch(argv: list[str], n: int, device: str, accelerate_config: Path | str | None = None) -> int:
    """Run ``harness.cli argv`` under ``accelerate launch`` with ``n`` processes (gloo on CPU), with the defaults of
    a DDP launch or with ``accelerate_config``; returns its exit status."""
    import subprocess

    import yaml

    # ``--multi_gpu`` starts n processes through torchrun; ``--cpu`` would start only one (accelerate's simple
    # launcher needs an MPI hostfile for more), so CPU runs say ACCELERATE_USE_CPU instead: n gloo processes.
    # Port 0: a free rendezvous port, so concurrent launches do not collide.
    head = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--main_process_port", "0"]
    extra: dict[str, str] = {}
    if accelerate_config is None:
        head += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        extra = {"ACCELERATE_USE_CPU": "true"} if device == "cpu" else {}
    else:
        head += ["--config_file", str(accelerate_config)]
        kind = (yaml.safe_load(Path(accelerate_config).read_text()) or {}).get("distributed_type", "")
        if device == "cpu":
            # accelerate drops DeepSpeed from a CPU launch: DeepSpeed's own CPU accelerator (gloo) instead; FSDP and
            # DDP configs run as gloo CPU processes (configs/accelerate/*_cpu.yaml)
            extra = {"DS_ACCELERATOR": "cpu"} if kind == "DEEPSPEED" else {"ACCELERATE_USE_CPU": "true"}
    cmd = [*head, "-m", "harness.cli", *argv]
    console.print(f"launching: {' '.join(f'{k}={v}' for k, v in extra.items())} {' '.join(cmd)}".strip())
    return subprocess.run(cmd, env={**os.environ, **extra}).returncode


def _relaunch(n: int, device: str, accelerate_config: Path | None = None) -> int:
    """Run this same ``run`` command under ``accelerate launch`` (``_launch``), less the options that asked so."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--num-processes", "--accelerate-config"):
            skip = True
            continue
        if a.startswith(("--num-processes=", "--accelerate-config=")):
            continue
        argv.append(a)
    return _launch(argv, n, device, accelerate_config)
