#!/usr/bin/env bash
# One prepared accelerator run (GPU or TPU): kernel lowering check, kernel benchmarks vs XLA, round
# breakdown + SPS(B) + AR vs speculative tokens/s at a Qwen3-4B-shaped random-weight target.
# Writes JSON into benchmarks/results/ (and a summary index). Run from anywhere, as-is:
#
#   bash benchmarks/accelerator_suite.sh            # full suite
#   QUICK=1 bash benchmarks/accelerator_suite.sh    # first shapes only, 8 target layers (smoke run)
#
# Needs a JAX with the accelerator plugin (pip install -e ".[cuda]" or ".[tpu]", see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
BACKEND=$($PY -c 'import jax; print(jax.default_backend())')
if [ "$BACKEND" = "cpu" ]; then
  echo "accelerator_suite: JAX sees no GPU/TPU (backend cpu); install the [cuda] or [tpu] extra first" >&2
  exit 1
fi
QUICK_FLAG=(); LAYERS=36; BATCHES=1,8,32,64
if [ "${QUICK:-0}" = "1" ]; then QUICK_FLAG=(--quick); LAYERS=8; BATCHES=1,8; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== 1/4 dspark info --check-kernels ($BACKEND)"
$PY -m dspark_jax.cli.main info --check-kernels --json > "$OUT/accel_info_$BACKEND.json" || echo "some kernel failed to lower (see $OUT/accel_info_$BACKEND.json)"

echo "== 2/4 kernel benchmarks (Pallas vs XLA reference)"
$PY benchmarks/bench_kernels.py "${QUICK_FLAG[@]}" --out "$OUT/kernels_$BACKEND.json"

echo "== 3/4 round breakdown, SPS(B), AR vs speculative tokens/s (Qwen3-4B shapes, $LAYERS layers)"
for CTX in 2048 8192; do
  $PY benchmarks/bench_accelerator.py --layers "$LAYERS" --batches "$BATCHES" --context "$CTX" \
      --out "$OUT/accelerator_${BACKEND}_ctx$CTX.json"
done

echo "== 4/4 per-round parts of the current loop (bench_speculative_round, Qwen3-4B width)"
$PY benchmarks/bench_speculative_round.py --layers "$LAYERS" --hidden 2560 --vocab 151936 --batches "$BATCHES" \
    --context 2048 --out "$OUT/speculative_round_$BACKEND.json"

$PY - "$OUT" "$BACKEND" <<'PYEOF'
import glob, json, os, sys
out, backend = sys.argv[1], sys.argv[2]
files = sorted(f for f in glob.glob(os.path.join(out, f"*{backend}*.json")) if not f.endswith("suite_index.json"))
json.dump({"backend": backend, "results": files}, open(os.path.join(out, f"suite_index_{backend}.json"), "w"), indent=2)
print("results:", *files, sep="\n  ")
PYEOF
