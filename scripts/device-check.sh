#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA tests, the GPU benchmark and the time-to-accuracy run, in a few
# minutes, then one summary. Uses the machine's own python3 with torch (PYTHON=... to choose another) and
# the package from this checkout (no install). Fashion-MNIST: FASHION_DIR, else .device-data/fashion-mnist
# (an ignored folder to carry the four IDX files in), else /usr/share/datasets/fashion-mnist.
#
#   bash scripts/device-check.sh            # everything (about 5 minutes on one large GPU)
#   QUICK=1 bash scripts/device-check.sh    # tests and a one-epoch benchmark only
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-/tmp/device-check}
mkdir -p "$out"
data=${FASHION_DIR:-}
if [ -z "$data" ]; then
  for d in .device-data/fashion-mnist /usr/share/datasets/fashion-mnist; do
    if [ -s "$d/train-images-idx3-ubyte.gz" ] || [ -s "$d/train-images-idx3-ubyte" ]; then data=$d; break; fi
  done
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "device-check: torch sees no CUDA device here; run this on a machine with a GPU"
  exit 2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee "$out/device.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee -a "$out/device.txt"

status=()
failed=0
step() {  # step NAME SECONDS CMD...: run, log to $out/NAME.log, remember the result
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  status+=("$name: exit $rc after $((SECONDS - t0)) s")
  [ "$rc" -eq 0 ] || failed=1
}

step tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/cuda tests/test_graphs.py
if [ -z "$data" ]; then
  status+=("benchmarks: not run (no Fashion-MNIST: set FASHION_DIR or carry .device-data/fashion-mnist)")
elif [ -n "${QUICK:-}" ]; then
  step gpu-bench 240 "$PY" benchmarks/gpu.py --data-dir "$data" --epochs 1
else
  step gpu-bench 300 "$PY" benchmarks/gpu.py --data-dir "$data" --epochs 3
  step time-to-accuracy 300 "$PY" benchmarks/time_to_accuracy.py --seeds 5 --data-dir "$data"
fi

echo
echo "== device-check summary"
cat "$out/device.txt"
for s in "${status[@]}"; do echo "- $s"; done
grep -hE "^[0-9]+ (passed|failed)|passed|failed" "$out/tests.log" 2>/dev/null | tail -1 | sed 's/^/tests: /'
[ -f "$out/gpu-bench.log" ] && grep -E "^\|" "$out/gpu-bench.log"
[ -f "$out/time-to-accuracy.log" ] && tail -1 "$out/time-to-accuracy.log"
exit $failed
