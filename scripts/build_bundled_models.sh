#!/usr/bin/env bash
# Reproduce the bundled model pair in models/ from local sources only (no downloads but the
# python3.11-doc Debian package): corpus -> tokenizer -> target -> DSpark + DFlash drafts ->
# STS calibration -> bf16 export into models/. Takes ~1.5-2 h on a 2-core CPU.
#   bash scripts/build_bundled_models.sh [WORK_DIR]   (default runs/bundle)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
W=${1:-runs/bundle}
D=".venv/bin/dspark"
mkdir -p "$W"
$D build-corpus --out "$W/corpus"
$D train-tokenizer --corpus "$W/corpus" --out "$W/tokenizer" --vocab-size 8192
$D train-target --corpus "$W/corpus" --tokenizer "$W/tokenizer" --out "$W/target" \
  --steps 1000 --compute-dtype bfloat16 --tie-word-embeddings true --ckpt-every 100 --eval-every 250 --no-progress
# The two drafters train side by side (one core each).
$D train-draft --target "$W/target" --corpus "$W/corpus" --out "$W/dspark_k7" --preset dspark \
  --num-draft-layers 1 --block-size 7 --steps 400 --no-progress &
$D train-draft --target "$W/target" --corpus "$W/corpus" --out "$W/dflash_k7" --preset dflash \
  --num-draft-layers 1 --block-size 7 --steps 400 --no-progress &
wait
$D calibrate --target "$W/target" --draft "$W/dspark_k7/draft" --corpus "$W/corpus" \
  --fit-data corpus:code corpus:prose --report-data corpus:code corpus:prose \
  --max-prompts 80 --max-new-tokens 128 --batch-size 8 --out "$W/calibration"
.venv/bin/python scripts/export_bundle.py "$W"
# K = 15 drafters for the block-size comparison (not bundled; evaluated from the work dir).
for P in dspark dflash; do
  $D train-draft --target "$W/target" --corpus "$W/corpus" --out "$W/${P}_k15" --preset $P \
    --num-draft-layers 1 --block-size 15 --steps 400 --no-progress &
done
wait
$D eval --target models/pystd-qwen3-target --draft dspark="$W/dspark_k15/draft" --draft dflash="$W/dflash_k15/draft" \
  --corpus "$W/corpus" --datasets corpus:code corpus:prose ../shared/data/eval_prompts/humaneval.jsonl \
  --block-sizes 7,15 --temperature 1.0 --max-new-tokens 96 --max-prompts 16 --batch-size 8 --out "$W/eval_k15_t1"
# The evaluation quoted in README.md / docs/results.md:
for T in 1.0 0; do
  $D eval --target models/pystd-qwen3-target --draft dspark=models/pystd-dspark-k7 --draft dflash=models/pystd-dflash-k7 \
    --corpus "$W/corpus" --datasets corpus:code corpus:prose ../shared/data/eval_prompts/humaneval.jsonl \
    --block-sizes 3,7 --temperature $T --max-new-tokens 96 --max-prompts 16 --batch-size 8 --out "$W/eval_t$T"
done
