#!/usr/bin/env bash
# Refresh the CI regression reference (results/reference/quick-smollm2/) on purpose, after a change that is
# meant to move results; commit the new files together with that change. Takes ~1-3 minutes on 2 CPU cores.
# Check without refreshing: python -m harness.analysis.regression   (or pytest tests/test_reference_regression.py)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m harness.analysis.regression --refresh
