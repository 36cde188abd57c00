"""Config: YAML + dotted overrides, type checks, clear errors."""

import pytest

from harness.config import ConfigError, RunConfig, apply_overrides, from_dict, to_dict


def test_defaults_roundtrip():
    cfg = RunConfig()
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    assert cfg.sequence == "quick" and cfg.methods == ("vanilla", "sft", "memgen") and cfg.model == "smollm2-135m"
    assert cfg.train.max_steps == 32 and cfg.train.lr == 1e-3 and cfg.eval.limit == 32


def test_overrides_and_types():
    cfg = apply_overrides(RunConfig(), ["train.lr=1e-4", "eval.limit=null", "methods=sft,vanilla", "seed=3",
                                        "method_options.memgen.k_prompt=4", "train.lora=false"])
    assert cfg.train.lr == 1e-4 and cfg.eval.limit is None and cfg.methods == ("sft", "vanilla")
    assert cfg.seed == 3 and cfg.method_options == {"memgen": {"k_prompt": 4}} and cfg.train.lora is False


@pytest.mark.parametrize(
    ("override", "msg"),
    [
        ("train.lr=abc", "train.lr: expected a number"),
        ("train.bogus=1", "unknown config key"),
        ("nothing", "must look like key.sub=value"),
        ("dtype=fp8", "dtype 'fp8' is not valid"),
        ("train.batch_size=0", "train.batch_size must be >= 1"),
        ("seed=1.5", "seed: expected an integer"),
        ("train.lora=maybe", "expected true/false"),
        ("train.scheduler=weird", "train.scheduler 'weird' is not valid"),
    ],
)
def test_bad_values(override, msg):
    with pytest.raises(ConfigError, match=msg):
        apply_overrides(RunConfig(), [override])


def test_limit_shortcut():
    cfg = apply_overrides(RunConfig(), ["limit=5"])
    assert cfg.train_limit == 5 and cfg.eval_limit == 5
    assert RunConfig().eval_limit == RunConfig().eval.limit
