"""`servelm generate` end to end on a tiny model: JSONL in, JSONL out."""
from __future__ import annotations

import json

from servelm.cli import main
from tests.conftest import random_prompts


def test_generate_jsonl(tiny_model_factory, tmp_path, capsys):
    d, _ = tiny_model_factory("llama")
    prompts = random_prompts(3, (4, 9, 20), seed=21)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "max_tokens": 5 + i}) + "\n"
                           for i, p in enumerate(prompts)))
    rc = main(["generate", "--model", d, "--skip-tokenizer-init", "--dtype", "float32",
               "--kv-cache-memory", str(1 << 24), "--input", str(src), "--output", str(dst),
               "--ignore-eos", "--no-tqdm"])
    assert rc == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["prompt_tokens"] for r in rows] == [4, 9, 20]
    assert [len(r["outputs"][0]["token_ids"]) for r in rows] == [5, 6, 7]
    assert all(r["outputs"][0]["finish_reason"] == "length" for r in rows)
    assert "output tok/s" in capsys.readouterr().err


def test_generate_reports_bad_input_as_error(tiny_model_factory, capsys):
    d, _ = tiny_model_factory("llama")
    rc = main(["generate", "--model", d, "--skip-tokenizer-init", "--kv-cache-memory",
               str(1 << 24), "--prompt", "text needs a tokenizer"])
    assert rc == 2
    assert "tokenizer" in capsys.readouterr().err
