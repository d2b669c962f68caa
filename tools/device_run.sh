#!/usr/bin/env bash
# Runs on the GPU machine (from the repo root, after `source .device/s3/stage.sh`): install, report the
# dispatch, run the tests, the main job and the given benchmark modules. Logs go to $OUT (or ./device-out).
#   bash tools/device_run.sh [pytest args...] -- [benchmark modules...]
set -uo pipefail
OUT=${OUT:-device-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
pytest_args=(); benches=(); seen=0
for a in "$@"; do
  if [ "$a" = "--" ]; then seen=1; continue; fi
  if [ $seen = 0 ]; then pytest_args+=("$a"); else benches+=("$a"); fi
done
pip install -e . --no-deps --no-build-isolation -q 2>&1 | tail -2
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python -m dsa_ops.backends 2>&1 | tee "$OUT/backends.txt"
if [ ${#pytest_args[@]} -gt 0 ]; then
  python -m pytest -q -p no:cacheprovider "${pytest_args[@]}" 2>&1 | tee "$OUT/pytest.log" | tail -40
fi
python -m dsa_ops 2>&1 | tee "$OUT/main.log" | tail -25
for b in "${benches[@]}"; do
  echo "== $b"; python -m "$b" 2>&1 | tee "$OUT/$(echo "$b" | tr ' /' '__').log" | tail -30
done
