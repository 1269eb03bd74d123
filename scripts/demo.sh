#!/usr/bin/env bash
# The main job, end to end on a CPU in a few minutes: prepare a corpus -> pretrain the tiny GPT-2 preset ->
# draw the loss graph -> generate samples from the trained model -> fine-tune it on Alpaca (before/after answers).
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
echo "== 1/5 prepare a corpus"
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

echo "== 2/5 pretrain the tiny preset on CPU (at most $MINUTES minutes)"
gpt2 pretrain --preset tiny --data "$DATA" --out "$RUN" --device cpu --max-steps 200 --warmup-steps 10 \
  --eval-every 25 --save-every 50 --val-tokens 4096 --max-minutes "$MINUTES"

echo "== 3/5 loss graph"
gpt2 plot "$RUN"

echo "== 4/5 samples from the trained model"
PROMPT="${GPT2_PROMPT:-ROMEO:}"
case "$SOURCE" in *shakespeare*) ;; *) PROMPT="${GPT2_PROMPT:-The meaning of life is}" ;; esac
gpt2 generate --model "$RUN/model" --max-steps 48 --temperature 0.8 --top-k 50 --seed 42 "$PROMPT" "$PROMPT"
echo "demo: run directory $RUN (metrics.jsonl, loss.png, checkpoint.pt, model/)"

# Fine-tuning: the pretrained tiny model learns Alpaca's question -> answer <|endoftext|> format.
# Data: the first GPT2_ALPACA_LIMIT (default 2000) records of tatsu-lab/alpaca from the Hub when it is reachable;
# otherwise (or when GPT2_ALPACA_SOURCE names a local .json/.jsonl file) that file, by default
# ../shared/data/alpaca_sample.json. GPT2_FINETUNE_STEPS (default 150) and GPT2_FINETUNE_MINUTES (default 2)
# bound the training.
echo "== 5/5 fine-tune on Alpaca: answers before and after"
ALPACA="$OUT/alpaca"
ALPACA_SOURCE="${GPT2_ALPACA_SOURCE:-}"
if [ -z "$ALPACA_SOURCE" ] && online; then
  echo "demo: streaming ${GPT2_ALPACA_LIMIT:-2000} Alpaca records from the Hugging Face Hub"
  gpt2 prepare alpaca --out "$ALPACA" --limit "${GPT2_ALPACA_LIMIT:-2000}" \
    || ALPACA_SOURCE=../shared/data/alpaca_sample.json
fi
if [ ! -f "$ALPACA/manifest.json" ] || [ -n "$ALPACA_SOURCE" ]; then
  ALPACA_SOURCE="${ALPACA_SOURCE:-../shared/data/alpaca_sample.json}"
  echo "demo: using local Alpaca records $ALPACA_SOURCE"
  rm -rf "$ALPACA"
  gpt2 prepare alpaca --source "$ALPACA_SOURCE" --out "$ALPACA"
fi
gpt2 finetune --preset tiny --init "$RUN" --data "$ALPACA" --out "$OUT/finetune" --device cpu \
  --max-steps "${GPT2_FINETUNE_STEPS:-150}" --max-minutes "${GPT2_FINETUNE_MINUTES:-2}"
echo "demo: fine-tuning run $OUT/finetune (samples.md: the answers above, metrics.jsonl, loss.png, model/)"
