#!/usr/bin/env bash
# The main job, end to end. Today: generate text with GPT-2 124M (OpenAI's weights from the Hugging Face
# Hub). Offline, it falls back to a freshly initialised tiny model so the pipeline still runs end to end.
set -euo pipefail
MODEL="${GPT2_MODEL:-gpt2}"
PROMPT="${GPT2_PROMPT:-Hello, I'm a language model,}"
if ! python -c "from gpt2.model import resolve_checkpoint_dir as r; r('$MODEL')" 2>/dev/null; then
  echo "demo: cannot load model '$MODEL' (offline?); using an untrained tiny model in runs/demo/random-tiny" >&2
  MODEL=runs/demo/random-tiny
  python -c "from gpt2.model import GPT, PRESETS; GPT(PRESETS['tiny']).save_pretrained('$MODEL')"
fi
gpt2 generate --model "$MODEL" --max-steps 40 --seed 42 "$PROMPT"
