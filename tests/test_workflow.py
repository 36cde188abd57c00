"""A researcher's workflow, through the CLI: the whole command is validated before anything is written, a directory
locks only once it holds results, tracking (TensorBoard event files read back, W&B offline run folder), the
model/template options, eval --checkpoint from the run's config, provenance warnings and missing extras."""

import json
import os
import shutil
import subprocess
import sys

import pytest

TINY = ["--model", "tiny-random", "--sequence", "arith", "--limit", "2", "--set", "train.max_steps=2",
        "--set", "eval.max_new_tokens=4"]


def cli(*args: str, env: dict | None = None, pre: str = "", timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter; ``pre`` runs first (e.g. blocking a module as a missing install would)."""
    code = f"{pre}\nimport sys\nfrom harness.cli import app\nsys.argv = ['memgen-bench', *sys.argv[1:]]\napp()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80", **(env or {})})


def error_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1, f"the error is not one line: {lines}"  # not hard-wrapped at 80 columns in a log
    return lines[0]


@pytest.mark.parametrize(("args", "msg"), [
    (["--model", "/no/such/model"], "model '/no/such/model' did not load"),
    (["--methods", "memgen", "--set", "method_options.memgn.k_prompt=8"], "method_options.memgn: no method 'memgn'"),
    (["--methods", "memgen", "--set", "method_options.memgen.k_promt=8"], "method_options.memgen.k_promt"),
    (["--methods", "sft", "--set", "method_options.sft.lr=1"], "method sft takes no options"),
    (["--methods", "grpo", "--set", "method_options.grpo.num_generations=3"], "does not divide train.batch_size"),
    (["--data-dir", "/no/such/dir", "--sequence", "gsm8k"], "data_dir /no/such/dir: no such folder"),
    (["--report-to", "comet"], "report_to 'comet' is not valid"),
    (["--chat-template", "/no/template.jinja"], "chat_template '/no/template.jinja' is not valid"),
    (["--model-args", "revision"], "--model-args item 'revision' must look like key=value"),
])
def test_validated_before_anything_is_written(tmp_path, args, msg):
    out = tmp_path / "runs"
    r = cli("run", *TINY, "--methods", "vanilla", *args, "--out", str(out))
    assert msg in error_line(r)
    assert not out.exists(), "a rejected command wrote its output directory"


def test_missing_data_file_named_before_writing(tmp_path):
    (tmp_path / "data" / "gsm8k").mkdir(parents=True)  # the task's folder exists, its file does not
    r = cli("run", *TINY, "--methods", "vanilla", "--sequence", "gsm8k", "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "runs"))
    assert "data file not found" in error_line(r) and "gsm8k/train.jsonl" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_config_command_validates_like_run():
    r = cli("config", "--set", "method_options.memgn.k_prompt=8")
    assert "no method 'memgn'" in error_line(r)


def test_directory_locks_only_once_it_holds_results(tmp_path):
    run = tmp_path / "runs" / "vanilla"
    run.mkdir(parents=True)
    # what a command that died before its first cell left behind, with another config
    (run / "config.json").write_text(json.dumps({"seed": 99, "model": "typo"}))
    r = cli("run", *TINY, "--methods", "vanilla", "--out", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "config.json").read_text())["model"] == "tiny-random"
    r = cli("run", *TINY, "--methods", "vanilla", "--seed", "5", "--out", str(tmp_path / "runs"))
    assert "holds a run with a different config (seed)" in error_line(r)


@pytest.mark.slow
def test_tensorboard_tracking_provenance_and_eval_from_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "runs"
    r = cli("run", *TINY, "--methods", "sft", "--report-to", "tensorboard", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    events = list((out / "sft" / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(out / "sft" / "tensorboard"))
    acc.Reload()
    steps = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert [s for s, _ in steps["train/arith/loss"]] == [1, 2]
    losses = json.loads((out / "sft" / "train" / "stage1.json").read_text())["losses"]
    assert [v for _, v in steps["stage1/arith/losses"]] == pytest.approx(losses, rel=1e-6)
    cells = [json.loads((out / "sft" / "cells" / f"r{i}_arith.json").read_text())["accuracy"] for i in (0, 1)]
    assert steps["eval/arith/accuracy"] == [(0, pytest.approx(cells[0])), (1, pytest.approx(cells[1]))]
    assert "eval/arith/tokens_per_s" in steps and "final/acc" in steps

    meta = json.loads((out / "sft" / "meta.json").read_text())
    assert meta["model"]["name"] == "tiny-random" and meta["model"]["dtype"] == "fp32"
    assert meta["chat_template"]["sha256"] and meta["chat_template"]["special_tokens"]["eos_token"]["id"] >= 0
    assert meta["data"]["arith"]["test"]["kind"] == "generator"
    assert "torch_version" in meta["hardware"] and "nvidia_driver_version" in meta["hardware"]
    assert meta["hardware"]["torch_threads"] >= 1
    cell = json.loads((out / "sft" / "cells" / "r1_arith.json").read_text())
    assert cell["generation"]["max_new_tokens"] == 4 and cell["generation"]["stop_token_ids"]

    # eval from the checkpoint: model, dtype and LoRA come from the run's config.json (no --model given)
    ev = cli("eval", "--task", "arith", "--checkpoint", str(out / "sft" / "checkpoints" / "stage1"), "--limit", "2",
             "--set", "eval.max_new_tokens=4", "--out", str(tmp_path / "ev"))
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "settings of" in ev.stderr and "model tiny-random" in ev.stderr and "method sft" in ev.stderr
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["model"] == "tiny-random"

    # report warns when the runs it aggregates differ in provenance
    other = tmp_path / "other" / "sft"
    shutil.copytree(out / "sft", other)
    meta["model"]["dtype"] = "bf16"
    (other / "meta.json").write_text(json.dumps(meta))
    rep = cli("report", str(out), str(tmp_path / "other"))
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "warning: the runs differ in model dtype" in rep.stderr.replace("\n", " ")


@pytest.mark.slow
def test_wandb_offline_writes_its_run_folder(tmp_path):
    out = tmp_path / "runs"
    r = cli("run", *TINY, "--methods", "vanilla", "--report-to", "wandb", "--out", str(out),
            env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((out / "vanilla" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((out / "vanilla").rglob("*"))


BLOCK_EXTRAS = ("import sys\nfor m in ('trl', 'sentence_transformers', 'bm25s', 'faiss', 'textworld_express', "
                "'tensorboard', 'wandb'):\n    sys.modules[m] = None  # as if not installed\n")


def test_missing_extra_is_one_line_naming_it(tmp_path):
    r = cli("run", *TINY, "--methods", "grpo", "--out", str(tmp_path / "r"), pre=BLOCK_EXTRAS)
    assert "method grpo needs the [rl] extra" in error_line(r) and "pip install 'memgen-bench[rl]'" in r.stderr
    r = cli("run", *TINY, "--methods", "vanilla", "--report-to", "tensorboard", "--out", str(tmp_path / "r"),
            pre=BLOCK_EXTRAS)
    assert "needs the [tracking] extra" in error_line(r)
    r = cli("run", *TINY, "--methods", "awm", "--out", str(tmp_path / "r"), pre=BLOCK_EXTRAS)
    assert "method awm needs the [retrieval] extra" in error_line(r)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_core_methods_run_without_any_extra(tmp_path):
    r = cli("run", *TINY, "--methods", "vanilla,sft,memgen", "--set", "train.train_limit=2",
            "--out", str(tmp_path / "r"), pre=BLOCK_EXTRAS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all((tmp_path / "r" / m / "summary.json").exists() for m in ("vanilla", "sft", "memgen"))


def test_version_and_help_choices():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("memgen-bench ")
    h = cli("run", "--help", env={"COLUMNS": "200"})
    assert "--report-to" in h.stdout and "--model-args" in h.stdout and "auto" in h.stdout
    assert "native, chatml, none" in h.stdout


def test_templated_task_from_test_only_yaml(tmp_path):
    """A SVAMP-like benchmark whose question spans two columns, defined by a YAML file only."""
    defs, data = tmp_path / "defs", tmp_path / "data"
    (data / "svamp_t").mkdir(parents=True)
    defs.mkdir()
    rows = [{"ID": f"s{i}", "Body": f"Ann has {i} apples.", "Question": "How many apples?", "Answer": i,
             "Type": "Addition"} for i in range(1, 6)]
    for split in ("train", "test"):
        (data / "svamp_t" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (defs / "svamp_t.yaml").write_text(
        'name: svamp_t\nversion: "1"\ndomain: math\nlocal: svamp_t\nsplits: {train: train, test: test}\n'
        'filter: last_number\nmetric: numeric\nuntil: ["Question:"]\n'
        'fields: {question: "{Body} {Question}", answer: Answer}\n'
        'prompt: "{Body}\\nQuestion: {Question} ({Type})\\nAnswer:"\n'
        'instruction: "Solve each problem.\\n\\n"\nnum_fewshot: 2\n')
    (defs / "svamp_j.yaml").write_text(
        'name: svamp_j\nversion: "1"\ndomain: math\nlocal: svamp_t\nsplits: {test: test}\n'
        'filter: last_number\nmetric: numeric\nfields: {answer: Answer, question: Question}\n'
        'prompt: "{{ Body }} {% if Type == \'Addition\' %}(add){% endif %} {{ Question | upper }}"\n')
    (defs / "svamp_bad.yaml").write_text(
        'name: svamp_bad\nversion: "1"\ndomain: math\nlocal: svamp_t\nsplits: {test: test}\n'
        'filter: last_number\nmetric: numeric\nfields: {answer: Answer, question: Question}\nprompt: "{Bdy}"\n')
    code = f"""
import json, os
os.environ['MEMGEN_BENCH_TASKS'] = {str(defs)!r}
from tasks.registry import get_task
from tasks.base import TaskError
t = get_task('svamp_t', {str(data)!r})
ex = t.load('test')
out = {{'question': ex[0].question, 'msg': t.user_message(ex[0]), 'score': t.score('5 Question: 3', ex[4])}}
j = get_task('svamp_j', {str(data)!r})
out['jinja'] = j.user_message(j.load('test')[0])
try:
    get_task('svamp_bad', {str(data)!r}).load('test')
except TaskError as exc:
    out['bad'] = str(exc)
try:
    get_task('svamp_bad', {str(data)!r}).check_data()
except TaskError as exc:
    out['bad_check'] = str(exc)
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["question"] == "Ann has 1 apples. How many apples?"
    # instruction, two shots from train (prompt, a space, the target; never the example itself), then the prompt
    msg = out["msg"]
    assert msg.startswith("Solve each problem.\n\n") and msg.endswith(
        "Ann has 1 apples.\nQuestion: How many apples? (Addition)\nAnswer:")
    assert msg.count("Answer:") == 3 and msg.count("Ann has 1 apples.") == 1
    assert out["score"] == 1.0  # cut at the until string "Question:" before the last-number filter
    assert out["jinja"] == "Ann has 1 apples. (add) HOW MANY APPLES?"
    assert "unknown column(s) ['Bdy']" in out["bad"] and "'Body'" in out["bad"]
    assert "unknown column(s) ['Bdy']" in out["bad_check"]

    # and end to end through the CLI: eval on the templated task, and run's preflight catches the bad template
    env = {"MEMGEN_BENCH_TASKS": str(defs)}
    ev = cli("eval", "--task", "svamp_t", "--model", "tiny-random", "--data-dir", str(data), "--limit", "2",
             "--set", "eval.max_new_tokens=4", "--out", str(tmp_path / "ev"), env=env)
    assert ev.returncode == 0, ev.stderr[-2000:]
    sample = json.loads((tmp_path / "ev" / "svamp_t.samples.jsonl").read_text().splitlines()[0])
    assert "Solve each problem." in sample["prompt"] and "(Addition)" in sample["prompt"]
    r = cli("run", "--model", "tiny-random", "--sequence", "svamp_t,svamp_bad", "--methods", "vanilla",
            "--data-dir", str(data), "--out", str(tmp_path / "r"), env=env)
    assert "unknown column(s) ['Bdy']" in error_line(r) and not (tmp_path / "r").exists()


def test_default_dtype_is_auto_and_every_record_gets_the_one_that_ran():
    """The default run's dtype is auto: smollm2-135m (published in bf16) runs in bf16 on a CPU with native bf16,
    tiny-random in fp32; a config built in code reaches the runner with auto and leaves it resolved, from the
    model handed in when there is one."""
    import torch

    from harness.config import RunConfig, apply_overrides
    from harness.models import checkpoint_dtype, load_model, resolve_auto_dtype
    from harness.runner import with_dtype

    native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert RunConfig().dtype == "auto"
    assert checkpoint_dtype("smollm2-135m") == "bf16" and checkpoint_dtype("tiny-random") == "fp32"
    assert resolve_auto_dtype("smollm2-135m", "cpu") == ("bf16" if native_bf16 else "fp32")
    assert resolve_auto_dtype("smollm2-135m", "cuda") == "bf16"
    assert with_dtype(RunConfig(model="tiny-random")).dtype == "fp32"
    assert with_dtype(RunConfig(model="smollm2-135m")).dtype == ("bf16" if native_bf16 else "fp32")
    handed = load_model("tiny-random", "bf16")
    assert with_dtype(RunConfig(model="tiny-random"), handed).dtype == "bf16"  # what the handed-in model is
    assert with_dtype(RunConfig(model="smollm2-135m", dtype="fp32")).dtype == "fp32"  # a pinned dtype stays
    full_ft = apply_overrides(RunConfig(), ["train.lora=false"])  # bf16 weights would lose AdamW's small steps
    assert with_dtype(full_ft).dtype == "fp32"
    assert with_dtype(apply_overrides(full_ft, ["dtype=bf16"])).dtype == "bf16"


def test_model_args_dtype_auto_and_chat_template_choices(tmp_path):
    """--model-args reach from_pretrained, auto picks the checkpoint's dtype by the CPU rule, and the chat template
    can be none, a file, and carry a system prompt; each choice is recorded with its own hash."""
    import torch

    from harness.models import chat_template_record, load_model, resolve_auto_dtype
    from tasks.base import render_prompt

    folder = tmp_path / "tiny"
    lm = load_model("tiny-random")
    lm.model.to(torch.bfloat16).save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder), "fp32", model_args={"attn_implementation": "eager", "revision": "main"})
    assert loaded.model.config._attn_implementation == "eager"
    native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert resolve_auto_dtype(str(folder), "cpu") == ("bf16" if native_bf16 else "fp32")
    assert resolve_auto_dtype(str(folder), "cuda") == "bf16"  # the checkpoint's own dtype (a config read only)
    assert next(load_model(str(folder), "auto").model.parameters()).dtype == (
        torch.bfloat16 if native_bf16 else torch.float32)

    none = load_model("tiny-random", chat_template="none")
    assert render_prompt("What is 2+2?", none.tokenizer) == "What is 2+2?\n"
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    own = load_model("tiny-random", chat_template=str(template), system_prompt='Be "brief".\nReally.')
    assert render_prompt("Hi", own.tokenizer) == '[system] Be "brief".\nReally.\n[user] Hi\n[assistant] '
    records = [chat_template_record(lm.tokenizer, "native"), chat_template_record(none.tokenizer, "none"),
               chat_template_record(own.tokenizer, str(template), 'Be "brief".\nReally.')]
    assert records[1]["sha256"] is None and records[2]["version"] == "file"
    assert records[0]["sha256"] != records[2]["sha256"] and records[2]["system_prompt"] == 'Be "brief".\nReally.'
    # the native template with a system prompt replaces the template's default system turn
    sys_native = load_model("tiny-random", system_prompt="You solve math.")
    text = render_prompt("Hi", sys_native.tokenizer)
    assert "You solve math." in text and text.count("<|im_start|>system") == 1
