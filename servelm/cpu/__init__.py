"""The CPU fast path: a C decode step built at first use (native.py, csrc/decode.c), the plan
that points it at a loaded model's weights and KV cache (plan.py), and the runner object the
model runner replays decode steps through (decode_step.py); thread settings in threads.py."""
