#!/usr/bin/env bash
# lm-evaluation-harness against `gpt2 serve`, checked against lm-eval's own `hf` backend on the same folder.
#
# Saves a random-weight `tiny` model (4 layers) as a model folder (weights + GPT-2 tokenizer files), serves it
# on 127.0.0.1, runs two local tasks (bench/lm_eval_tasks: a multiple-choice loglikelihood task and a
# generate_until task) through `local-completions` with token-id prompts (tokenized_requests=True) and with text
# prompts (False), then through `hf`, and compares per-choice log-likelihoods (bench/lm_eval_compare.py, 1e-3).
#
# Usage: bench/lm_eval_server.sh [OUT_DIR]
#   PY        python with this project's dependencies (default: python)
#   LM_EVAL   the lm_eval command, e.g. /path/to/venv/bin/lm_eval (default: lm_eval); lm-eval needs torch and
#             transformers in its environment for the hf backend
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-$(mktemp -d)}")
PY=${PY:-python}
LM_EVAL=${LM_EVAL:-lm_eval}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$(realpath ../shared/tiktoken_cache)}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

"$PY" bench/lm_eval_tasks/make_data.py
"$PY" -c 'import sys, torch; from gpt2.export import save_model_folder; from gpt2.model import GPT, PRESETS
torch.manual_seed(0); save_model_folder(GPT(PRESETS["tiny"]), sys.argv[1])' "$OUT/model"

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" -m gpt2 serve --model "$OUT/model" --host 127.0.0.1 --port "$PORT" --threads 1 >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 0.5
done

TASKS=(--tasks alpaca_mc_local,alpaca_gen_local --include_path bench/lm_eval_tasks --log_samples)
for tokenized in True False; do
  set -x
  "$LM_EVAL" --model local-completions "${TASKS[@]}" --output_path "$OUT/server-tokenized-$tokenized" \
    --model_args "model=$OUT/model,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer=$OUT/model,tokenizer_backend=huggingface,tokenized_requests=$tokenized,num_concurrent=1,max_length=256"
  { set +x; } 2>/dev/null
done
set -x
"$LM_EVAL" --model hf --model_args "pretrained=$OUT/model,dtype=float32" --device cpu --batch_size 1 "${TASKS[@]}" \
  --output_path "$OUT/hf"
{ set +x; } 2>/dev/null

status=0
for tokenized in True False; do
  echo "== hf vs local-completions (tokenized_requests=$tokenized)"
  "$PY" bench/lm_eval_compare.py "$OUT/hf" "$OUT/server-tokenized-$tokenized" --tol 1e-3 || status=1
done
exit $status
