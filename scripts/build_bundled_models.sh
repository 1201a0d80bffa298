#!/usr/bin/env bash
# Reproduce the bundled model pair in models/ from local sources only (no downloads but the
# python3.11-doc Debian package): corpus -> tokenizer -> target -> DSpark + DFlash drafts ->
# STS calibration -> bf16 export into models/. Takes ~3-4 h on a 2-core CPU (the Eagle-3 drafter alone ~40 min).
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
# Spec 4.1 step 2: the target rewrites the training text (DeepSpec's sampling: T 0.7, top-p 0.8, top-k 20).
$D regenerate --target "$W/target" --corpus "$W/corpus" --out "$W/regen" --prompts-per-domain 4096 \
  --batch-size 64 --no-progress
# The two bundled drafters train side by side (one core each) on the regenerated corpus.
$D train-draft --target "$W/target" --corpus "$W/regen" --out "$W/dspark_k7" --preset dspark \
  --num-draft-layers 1 --block-size 7 --steps 1500 --ckpt-every 250 --no-progress &
$D train-draft --target "$W/target" --corpus "$W/regen" --out "$W/dflash_k7" --preset dflash \
  --num-draft-layers 1 --block-size 7 --steps 1500 --ckpt-every 250 --no-progress &
wait
# The Eagle-3 baseline (spec §9.2, TTT length 7; issue 14), bundled as models/pystd-eagle3-k7: the bundled
# DSpark/DFlash recipe (1500 steps, batch 8 x 256, on the regenerated corpus). An Eagle-3 step costs ~7.5x a
# DSpark step here (soft CE over the full vocabulary at every position x 7 TTT steps): ~2.5 h on 2 idle cores
# (resumable with --resume). Then the short recipe (400 steps on the source corpus, not bundled), as the
# DSpark/DFlash pair of the short-recipe three-way table below.
$D train-draft --target models/pystd-qwen3-target --corpus "$W/regen" --out "$W/eagle3_k7" --preset eagle3 \
  --num-draft-layers 1 --block-size 7 --steps 1500 --ckpt-every 250 --no-progress
$D train-draft --target models/pystd-qwen3-target --corpus "$W/corpus" --out "$W/eagle3_k7_400b" --preset eagle3 \
  --num-draft-layers 1 --block-size 7 --steps 400 --ckpt-every 100 --no-progress
$D calibrate --target "$W/target" --draft "$W/dspark_k7/draft" --corpus "$W/corpus" \
  --fit-data corpus:code corpus:prose --report-data corpus:code corpus:prose \
  --max-prompts 80 --max-new-tokens 128 --batch-size 8 --out "$W/calibration"
.venv/bin/python scripts/export_bundle.py "$W"
# Block-size trend (not bundled): K = 7 and K = 15 pairs all trained with the short recipe (400
# steps on the source corpus), each pair evaluated at its own K.
for K in 7 15; do
  for P in dspark dflash; do
    $D train-draft --target "$W/target" --corpus "$W/corpus" --out "$W/${P}_k${K}_400" --preset $P \
      --num-draft-layers 1 --block-size $K --steps 400 --no-progress &
  done
  wait
  $D eval --target models/pystd-qwen3-target --draft dspark="$W/dspark_k${K}_400/draft" \
    --draft dflash="$W/dflash_k${K}_400/draft" --corpus "$W/corpus" \
    --datasets corpus:code corpus:prose ../shared/data/eval_prompts/humaneval.jsonl \
    --block-sizes $K --temperature 1.0 --max-new-tokens 96 --max-prompts 16 --batch-size 8 --out "$W/eval_k${K}_400_t1"
done
# DSpark and DFlash with the bundled Eagle-3 drafter's recipe (400 steps on the source corpus, against the
# bundled target), for the three-way table.
for P in dspark dflash; do
  $D train-draft --target models/pystd-qwen3-target --corpus "$W/corpus" --out "$W/${P}_k7_400b" --preset $P \
    --num-draft-layers 1 --block-size 7 --steps 400 --no-progress &
done
wait
# The evaluations quoted in README.md / docs/results.md: the bundled DSpark vs DFlash drafters; the three
# bundled drafters (DSpark vs DFlash vs Eagle-3, one recipe: 1500 steps on the regenerated corpus, K = 7);
# and the three with the short recipe (400 steps on the source corpus, K = 7).
for T in 1.0 0; do
  $D eval --target models/pystd-qwen3-target --draft dspark=models/pystd-dspark-k7 --draft dflash=models/pystd-dflash-k7 \
    --corpus "$W/corpus" --datasets corpus:code corpus:prose ../shared/data/eval_prompts/humaneval.jsonl \
    --block-sizes 3,7 --temperature $T --max-new-tokens 96 --max-prompts 16 --batch-size 8 --out "$W/eval_t$T"
  $D eval --target models/pystd-qwen3-target --draft dspark=models/pystd-dspark-k7 \
    --draft dflash=models/pystd-dflash-k7 --draft eagle3=models/pystd-eagle3-k7 --corpus "$W/corpus" \
    --datasets corpus:code corpus:prose ../shared/data/eval_prompts/humaneval.jsonl \
    --block-sizes 7 --temperature $T --max-new-tokens 96 --max-prompts 16 --batch-size 8 --no-autoregressive \
    --out "$W/eval_bundled3_t$T"
  $D eval --target models/pystd-qwen3-target --draft dspark="$W/dspark_k7_400b/draft" \
    --draft dflash="$W/dflash_k7_400b/draft" --draft eagle3="$W/eagle3_k7_400b/draft" --corpus "$W/corpus" \
    --datasets corpus:code corpus:prose ../shared/data/eval_prompts/humaneval.jsonl \
    --block-sizes 7 --temperature $T --max-new-tokens 96 --max-prompts 16 --batch-size 8 --no-autoregressive \
    --out "$W/eval_3way_t$T"
done
