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
  gpt2 prepare fineweb --out "$DATA" --total-tokens 2000000 --shard-tokens 1000000 --val-tokens 50000 || SOURCE=$FALLBACK
fi
if [ ! -d "$DATA" ] || [ -n "$SOURCE" ]; then
  SOURCE="${SOURCE:-$FALLBACK}"
  echo "demo: using local text $SOURCE"
  rm -rf "$DATA"
  gpt2 prepare fineweb --source "$SOURCE" --out "$DATA" --shard-tokens 1000000 --val-tokens 30000
fi

# The tiny preset (4 layers, 128 wide, 2048 tokens a step) with a shorter schedule than its 300 steps.
echo "== 2/5 pretrain the tiny preset on CPU (${GPT2_PRETRAIN_STEPS:=60} steps)"
gpt2 pretrain --preset tiny --data "$DATA" --out "$RUN" --device cpu --max-steps "$GPT2_PRETRAIN_STEPS" \
  --warmup-steps 10 --eval-every 10 --save-every 0 --val-tokens 8192

echo "== 3/5 loss graph"
gpt2 plot "$RUN"

echo "== 4/5 samples from the trained model"
PROMPT="${GPT2_PROMPT:-ROMEO:}"
case "$SOURCE" in *shakespeare*) ;; *) PROMPT="${GPT2_PROMPT:-The meaning of life is}" ;; esac
gpt2 generate --model "$RUN/model" --max-tokens 48 --temperature 0.8 --top-k 50 --seed 42 "$PROMPT" "$PROMPT"

# Fine-tuning: the pretrained tiny model learns Alpaca's question -> answer <|endoftext|> format. A 7M model
# pretrained for a minute cannot answer new questions, so it is given what it can learn: the records without an
# input whose answer is at most 16 tokens, among the first 335 of Alpaca (34 records), repeated for 80 epochs;
# samples.md then asks four of those questions (the finetune `tiny` preset holds that recipe). Records: the JSON
# file GPT2_ALPACA_SOURCE, by default ../shared/data/alpaca_sample.json (Alpaca's first 335 records), else
# Stanford Alpaca's alpaca_data.json downloaded from GitHub.
echo "== 5/5 fine-tune on Alpaca: answers before and after"
ALPACA="$OUT/alpaca"
ALPACA_SOURCE="${GPT2_ALPACA_SOURCE:-../shared/data/alpaca_sample.json}"
mkdir -p "$ALPACA"
python - "$ALPACA_SOURCE" "$ALPACA/short.json" <<'EOF'
import json, sys, urllib.request
from pathlib import Path
from gpt2.tokenizer import encode

src, out = sys.argv[1:]
if Path(src).is_file():
    records = json.loads(Path(src).read_text())
else:
    url = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
    print(f"demo: {src} not found; downloading {url}")
    records = json.load(urllib.request.urlopen(url, timeout=60))
short = [r for r in records[:335] if not r["input"] and len(encode(r["output"])) <= 16]
Path(out).write_text(json.dumps(short, indent=1))
print(f"demo: {len(short)} short Alpaca records (no input, answers of at most 16 tokens) -> {out}")
EOF
gpt2 prepare alpaca --source "$ALPACA/short.json" --out "$ALPACA" --val-fraction 0
gpt2 finetune --preset tiny --init "$RUN" --data "$ALPACA" --out "$SFT" --device cpu

# What the demo showed, from the runs' own files.
python - "$RUN" "$SFT" <<'EOF'
import json, sys
from pathlib import Path

def evals(run):
    lines = (json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines())
    return [r for r in lines if r["kind"] == "eval" and "val_loss" in r]

pre = evals(sys.argv[1])
print(f"demo: pretraining val loss {pre[0]['val_loss']:.2f} at step 0 -> {pre[-1]['val_loss']:.2f} at step "
      f"{pre[-1]['step']} (loss graph: {sys.argv[1]}/loss.png)")
steps = [json.loads(x) for x in (Path(sys.argv[2]) / "metrics.jsonl").read_text().splitlines()]
steps = [r for r in steps if r["kind"] == "train"]
print(f"demo: fine-tuning loss on the answers {steps[0]['loss']:.2f} at step 1 -> {steps[-1]['loss']:.2f} at step "
      f"{steps[-1]['step']} (loss graph: {sys.argv[2]}/loss.png)")
print(f"demo: answers before and after fine-tuning: {sys.argv[2]}/samples.md")
EOF
echo "demo: done in $((SECONDS - start)) s. Next (after 'source .venv/bin/activate'):"
echo "  gpt2 generate --model $RUN \"$PROMPT\"                      # more samples"
echo "  gpt2 chat --model $SFT                                     # talk to the fine-tuned model"
echo "  gpt2 pretrain --out $RUN --resume --max-steps 300          # continue pretraining (same settings, longer schedule)"
