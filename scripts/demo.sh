#!/usr/bin/env bash
# The main job, end to end on a CPU in a few minutes: prepare a corpus -> pretrain a tiny GPT-2 -> draw the
# loss graph -> generate samples from the trained model -> fine-tune it on Alpaca (before/after answers).
#
# Every stage runs a fixed number of steps (no wall-clock cap), so the result does not depend on how fast or
# busy the machine is: about 4 minutes on an idle 2-core CPU.
#
# Corpus: a sample of FineWeb streamed from the Hugging Face Hub when it is reachable; otherwise (or when
# GPT2_DATA_SOURCE names a local .txt/.jsonl/.parquet file or folder) that local text, by default
# ../shared/data/tinyshakespeare.txt.
set -euo pipefail
OUT="${GPT2_DEMO_DIR:-runs/demo}"
DATA="$OUT/data"
RUN="$OUT/pretrain"
SFT="$OUT/finetune"
SOURCE="${GPT2_DATA_SOURCE:-}"
FALLBACK=../shared/data/tinyshakespeare.txt

online() { python -c "import urllib.request; urllib.request.urlopen('https://huggingface.co', timeout=5)" 2>/dev/null; }

start=$SECONDS
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

# The tiny preset (4 layers, 128 wide, 2048 tokens a step) with a shorter schedule than its 300 steps.
echo "== 2/5 pretrain the tiny preset on CPU (${GPT2_PRETRAIN_STEPS:=120} steps)"
gpt2 pretrain --preset tiny --data "$DATA" --out "$RUN" --device cpu --max-steps "$GPT2_PRETRAIN_STEPS" \
  --warmup-steps 10 --eval-every 20 --save-every 0 --val-tokens 8192

echo "== 3/5 loss graph"
gpt2 plot "$RUN"

echo "== 4/5 samples from the trained model"
PROMPT="${GPT2_PROMPT:-ROMEO:}"
case "$SOURCE" in *shakespeare*) ;; *) PROMPT="${GPT2_PROMPT:-The meaning of life is}" ;; esac
gpt2 generate --model "$RUN/model" --max-steps 48 --temperature 0.8 --top-k 50 --seed 42 "$PROMPT" "$PROMPT"

# Fine-tuning: the pretrained tiny model learns Alpaca's question -> answer <|endoftext|> format.
# Data: the first GPT2_ALPACA_LIMIT (default 2000) records of tatsu-lab/alpaca from the Hub when it is reachable;
# otherwise (or when GPT2_ALPACA_SOURCE names a local .json/.jsonl file) that file, by default
# ../shared/data/alpaca_sample.json (335 records). The finetune `tiny` preset holds the recipe (epochs, LR,
# and questions from the training records for samples.md: a 7M model can learn to answer those, not new ones).
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
gpt2 finetune --preset tiny --init "$RUN" --data "$ALPACA" --out "$SFT" --device cpu

# What the demo showed, from the runs' own files.
python - "$RUN" "$SFT" <<'EOF'
import json, sys
from pathlib import Path

def evals(run):
    lines = (json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines())
    return [r for r in lines if r["kind"] == "eval" and "val_loss" in r]

pre, sft = evals(sys.argv[1]), evals(sys.argv[2])
print(f"demo: pretraining val loss {pre[0]['val_loss']:.2f} at step 0 -> {pre[-1]['val_loss']:.2f} at step "
      f"{pre[-1]['step']} (loss graph: {sys.argv[1]}/loss.png)")
if sft:
    print(f"demo: fine-tuning val loss {sft[0]['val_loss']:.2f} -> {sft[-1]['val_loss']:.2f} "
          f"(held-out Alpaca answers; loss graph: {sys.argv[2]}/loss.png)")
print(f"demo: answers before and after fine-tuning: {sys.argv[2]}/samples.md")
EOF
echo "demo: done in $((SECONDS - start)) s. Next (after 'source .venv/bin/activate'):"
echo "  gpt2 generate --model $RUN \"$PROMPT\"                      # more samples"
echo "  gpt2 chat --model $SFT                                     # talk to the fine-tuned model"
echo "  gpt2 pretrain --out $RUN --resume --max-steps 300          # continue pretraining (same settings, longer schedule)"
