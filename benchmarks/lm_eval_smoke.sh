#!/usr/bin/env bash
# lm-eval's `local-completions` against `servelm serve`, with its default arguments (the
# tokenizer is the server's: lm-eval finds /tokenizer_info and /tokenize and uses them), on two
# tiny local tasks of benchmarks/lm_eval_task/: loglikelihood (multiple choice, scored with
# echo=true and logprobs on token-id prompts) and generate_until (greedy, stop strings).
# A smoke test of the API surface, not a quality benchmark: six questions each.
#
#   benchmarks/lm_eval_smoke.sh [MODEL [SERVED_NAME]]
#
# MODEL: a HF directory or .gguf (default: the embedded SmolLM2-135M-Instruct). Needs
# `pip install lm-eval`; nothing is downloaded (the tasks' data is a local JSONL file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LM_EVAL=${LM_EVAL:-$(dirname "$PY")/lm_eval}
# a free port unless given: another server on a fixed port would answer our health checks
PORT=${PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
MODEL=${1:-}
NAME=${2:-${MODEL:-SmolLM2-135M-Instruct}}

"$PY" -m servelm.cli serve ${MODEL:+"$MODEL"} --served-model-name "$NAME" --port "$PORT" \
    --device "${DEVICE:-auto}" --max-model-len 2048 > /tmp/servelm_lm_eval_smoke.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    kill -0 $SERVER 2>/dev/null || { cat /tmp/servelm_lm_eval_smoke.log; exit 1; }
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    sleep 1
done
sleep 1  # the bind comes after "ready": a port taken meanwhile shows as an exit here
kill -0 $SERVER 2>/dev/null || { cat /tmp/servelm_lm_eval_smoke.log; exit 1; }

HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$LM_EVAL" --model local-completions \
    --model_args "model=$NAME,base_url=http://127.0.0.1:$PORT/v1/completions" \
    --include_path benchmarks/lm_eval_task \
    --tasks servelm_smoke_ll,servelm_smoke_gen \
    --batch_size 1 --log_samples --output_path /tmp/servelm_lm_eval_smoke
