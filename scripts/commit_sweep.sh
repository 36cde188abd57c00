#!/usr/bin/env bash
# Stage the finished run directories of a sweep (summary.json says complete) without their checkpoints (.gitignore),
# plus the sweep's base config, so a later `memgen-bench sweep` with the same --out skips them and runs the rest.
#   scripts/commit_sweep.sh results/sweeps/quick-default && git commit -m "sweep: finished runs"
set -euo pipefail
root="${1:?usage: scripts/commit_sweep.sh SWEEP_DIR}"
[ -d "$root" ] || { echo "commit_sweep: no such sweep folder $root" >&2; exit 1; }
n=0
while IFS= read -r summary; do
  run=$(dirname "$summary")
  if python3 -c "import json,sys; sys.exit(0 if json.load(open('$summary')).get('complete') else 1)"; then
    git add -- "$run"
    n=$((n + 1))
  fi
done < <(find "$root" -name summary.json -not -path "*/eval-cache/*" | sort)
[ -f "$root/sweep_base.yaml" ] && git add -- "$root/sweep_base.yaml"
echo "commit_sweep: staged $n finished run(s) under $root"
