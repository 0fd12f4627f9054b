#!/usr/bin/env bash
# GPU checks in one go (≤ 8.5 minutes on one GPU): the pytest tests marked `gpu` (tests/test_gpu.py) and the GPU rows
# of the benchmark, then a summary. Run it from anywhere on a machine with CUDA:
#
#     bash tests/gpu_check.sh            # logs and the bench JSON go to $OUT if set, else to var/gpu_check/
#
# Nothing here is simulated: without CUDA the script stops at once with exit 2 and says so. Record its summary in
# docs/benchmarks.md ("GPU checks") when it has run.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-var/gpu_check}"
mkdir -p "$LOGS"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="$(command -v python3 || command -v python)"; fi
PYTEST_LIMIT_S=330   # the pytest part (two AMP runs, two caches, augmentation and shards vs the CPU, a worker job,
                     # export + parity, TensorRT)
BENCH_LIMIT_S=150    # python -m tests.bench --only gpu --quick (its last row: the shard loader feeding the GPU)
t0=$(date +%s)

echo "== machine"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/   /'
if ! "$PY" - <<'EOF'
import sys
import torch
print(f"   python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} device(s)")
if not torch.cuda.is_available():
    print("   no CUDA device visible to torch: nothing to check (this script never fakes GPU results)")
    sys.exit(2)
print(f"   device 0: {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
try:
    import tensorrt
    print(f"   tensorrt {tensorrt.__version__}")
except ImportError:
    print("   tensorrt: not installed (its test is skipped with the reason)")
EOF
then
  exit 2
fi

echo "== pytest -m gpu (limit ${PYTEST_LIMIT_S} s)"
timeout -k 10 "$PYTEST_LIMIT_S" "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider \
  --junitxml="$LOGS/pytest_gpu.xml" 2>&1 | tee "$LOGS/pytest_gpu.log"
pytest_rc=${PIPESTATUS[0]}

echo "== python -m tests.bench --only gpu --quick (limit ${BENCH_LIMIT_S} s)"
timeout -k 10 "$BENCH_LIMIT_S" "$PY" -m tests.bench --only gpu --quick --no-docs --json "$LOGS/bench_gpu.json" \
  2>&1 | tee "$LOGS/bench_gpu.log"
bench_rc=${PIPESTATUS[0]}

echo "== summary ($(( $(date +%s) - t0 )) s)"
echo "   pytest -m gpu: exit ${pytest_rc}$([ "$pytest_rc" = 124 ] && echo ' (timed out)'); $(grep -Eo '[0-9]+ (passed|failed|skipped|error)[a-z]*' "$LOGS/pytest_gpu.log" | tr '\n' ' ')"
echo "   bench --only gpu: exit ${bench_rc}$([ "$bench_rc" = 124 ] && echo ' (timed out)')"
"$PY" - "$LOGS/bench_gpu.json" <<'EOF'
import json
import sys
from pathlib import Path

path = Path(sys.argv[1])
rows = json.loads(path.read_text()) if path.exists() else []
for r in rows:
    value = "n/a" if r["value"] is None else f"{r['value']:.3g} {r['unit']}"
    print(f"   {r['name']}: {value}  {r.get('note', '')}")
if not rows:
    print("   no bench rows written")
EOF
[ "$pytest_rc" = 0 ] && [ "$bench_rc" = 0 ]
