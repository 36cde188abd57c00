"""Per-optimizer-step tracking: a tiny-random TensorBoard run of MemGen (weaver SFT, 2 steps) and of the
Trainer-based ``sft`` writes, beside the runner's cells, one event log per run directory whose per-step train
scalars (loss and learning rate, and tokens/s for the custom loop) are read back with tensorboard's reader."""

import json

import pytest

from tests.test_workflow import TINY, cli


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = list(run_dir.rglob("events.out.tfevents.*"))
    assert len({p.parent for p in logs}) == 1, f"more than one event log in {run_dir}: {logs}"
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.parametrize(("method", "phase"), [("memgen", "weaver-sft_"), ("sft", "")])
def test_per_step_train_scalars_read_back(tmp_path, method, phase):
    out = tmp_path / "runs"
    r = cli("run", *TINY, "--methods", method, "--report-to", "tensorboard", "--set", "train.lr=1e-3",
            "--set", "train.warmup_ratio=0", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    steps = _scalars(out / method)
    loss, lr = steps[f"train/arith/{phase}loss"], steps[f"train/arith/{phase}learning_rate"]
    assert [s for s, _ in loss] == [1, 2] and [s for s, _ in lr] == [1, 2]
    recorded = json.loads((out / method / "train" / "stage1.json").read_text())["losses"]
    assert [v for _, v in loss] == pytest.approx(recorded, rel=1e-6)
    # the rate each step used: cosine over 2 steps, no warmup: 1e-3, then 1e-3 * (1 + cos(pi / 2)) / 2 = 5e-4
    assert [v for _, v in lr] == pytest.approx([1e-3, 5e-4], rel=1e-6)
    if method == "memgen":  # the custom loop measures its own throughput
        assert all(v > 0 for _, v in steps["train/arith/weaver-sft_tokens_per_s"])
    else:  # the Trainer's log dict is forwarded as it is (grad_norm too)
        assert [s for s, _ in steps["train/arith/grad_norm"]] == [1, 2]
