#!/bin/bash
# #12 on the GPU: structured-output tests on CUDA, then fresh-process pairs of the B=256 bench
# (masks in the engine thread vs the mask process), alternating, until the time budget.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD TRITON_INTERPRET=0
T0=$(date +%s)
BUDGET=${BUDGET:-540}
if [ "${TESTS:-1}" = 1 ]; then
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/unit/test_structured_output.py \
    tests/unit/test_kernels_bitmask.py tests/unit/test_sampler.py \
    tests/e2e/test_structured_outputs.py -k "processor or process or greedy or async or bitmask or sampler or seed" > $OUT/tests.log 2>&1
  echo "tests: $(tail -1 $OUT/tests.log)"
fi
i=0
while :; do
  for m in ${MODES:-off on}; do
    now=$(date +%s); left=$((BUDGET - (now - T0)))
    [ $left -lt 60 ] && break 2
    i=$((i+1))
    timeout $((left - 5)) python3 benchmarks/structured_bench.py --model devscripts/smol8b --load-format dummy \
      --batch 256 --max-tokens 96 --repeat 3 --schemas ${SCHEMAS:-24} --mask-process $m \
      --json-out /tmp/r.json > /tmp/r.log 2>&1
    echo "== run $i mask_process=$m ($(( $(date +%s) - now )) s)" >> $OUT/bench.log
    cat /tmp/r.log >> $OUT/bench.log; (echo "{\"run\": $i, \"mode\": \"$m\", \"result\": "; cat /tmp/r.json; echo "}") | tr -d '\n' >> $OUT/runs.jsonl; echo >> $OUT/runs.jsonl
    echo "run $i mask_process=$m ($(( $(date +%s) - now )) s): $(grep 'TPOT ms' /tmp/r.log)"
    grep "TTFT added" /tmp/r.log | sed 's/^/    /'
  done
done
