#!/usr/bin/env bash
# The main job, end to end on a CPU in a few minutes: prepare a corpus -> pretrain the tiny GPT-2 preset ->
# draw the loss graph -> generate samples from the trained model.
#
# Corpus: a sample of FineWeb streamed from the Hugging Face Hub when it is reachable; otherwise (or when
# GPT2_DATA_SOURCE names a local .txt/.jsonl/.parquet file or folder) that local text, by default
# ../shared/data/tinyshakespeare.txt. GPT2_TRAIN_MINUTES bounds the pretraining time (default 3).
set -euo pipefail
OUT="${GPT2_DEMO_DIR:-runs/demo}"
DATA="$OUT/data"
RUN="$OUT/pretrain"
MINUTES="${GPT2_TRAIN_MINUTES:-3}"
SOURCE="${GPT2_DATA_SOURCE:-}"
FALLBACK=../shared/data/tinyshakespeare.txt

online() { python -c "import urllib.request; urllib.request.urlopen('https://huggingface.co', timeout=5)" 2>/dev/null; }

rm -rf "$OUT"
echo "== 1/4 prepare a corpus"
if [ -z "$SOURCE" ] && online; then
  echo "demo: streaming a 2M-token FineWeb sample from the Hugging Face Hub"
  gpt2 prepare fineweb --out "$DATA" --max-tokens 2000000 --shard-tokens 1000000 --val-tokens 50000 || SOURCE=$FALLBACK
fi
if [ ! -d "$DATA" ] || [ -n "$SOURCE" ]; then
  SOURCE="${SOURCE:-$FALLBACK}"
  echo "demo: using local text $SOURCE"
  rm -rf "$DATA"
  gpt2 prepare fineweb --source "$SOURCE" --out "$DATA" --shard-tokens 1000000 --val-tokens 30000
fi

echo "== 2/4 pretrain the tiny preset on CPU (at most $MINUTES minutes)"
gpt2 pretrain --preset tiny --data "$DATA" --out "$RUN" --device cpu --max-steps 200 --warmup-steps 10 \
  --eval-every 25 --save-every 50 --val-tokens 4096 --max-minutes "$MINUTES"

echo "== 3/4 loss graph"
gpt2 plot "$RUN"

echo "== 4/4 samples from the trained model"
PROMPT="${GPT2_PROMPT:-ROMEO:}"
case "$SOURCE" in *shakespeare*) ;; *) PROMPT="${GPT2_PROMPT:-The meaning of life is}" ;; esac
gpt2 generate --model "$RUN/model" --max-steps 48 --temperature 0.8 --top-k 50 --seed 42 "$PROMPT" "$PROMPT"
echo "demo: run directory $RUN (metrics.jsonl, loss.png, checkpoint.pt, model/)"
