"""`servelm bench perplexity` on a tiny random Llama: chunked scoring through the paged KV cache
equals one whole-sequence HF forward; a configuration against itself; the config parser; the
command line end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch

from servelm.bench.perplexity import (iter_logprobs, load_config, parse_config,
                                      run_perplexity)
from servelm.cli import main

BASE = dict(model=None, tokenizer=None, load_format="auto", dtype="float32", device="cpu")


def _ids(n: int, seed: int = 7) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n,), generator=g).tolist()


def _hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[n - 1, vocab]: the next-token log-probs of one whole-sequence forward, fp32."""
    with torch.inference_mode():
        return hf_model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


@pytest.fixture
def tiny(tiny_model_factory):
    d, hf_model = tiny_model_factory("llama")
    return {**BASE, "model": d}, hf_model


def test_chunked_paged_logprobs_equal_whole_sequence_hf(tiny):
    base, hf_model = tiny
    ids = _ids(300)
    # chunks of 37 over blocks of 8: chunk edges fall inside blocks; the last chunk is short
    cfg = load_config(base, "block_size=8", len(ids))
    got = torch.cat([lp for _, lp in iter_logprobs(cfg, ids, chunk_size=37)])
    want = _hf_logprobs(hf_model, ids)
    assert got.shape == want.shape == (299, 256)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_config_against_itself(tiny):
    base, hf_model = tiny
    ids = _ids(200, seed=3)
    ref, same = run_perplexity(["dtype=float32", "block_size=4"], base, ids, chunk_size=64)
    assert ref.num_tokens == same.num_tokens == 199
    assert same.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert same.top1_agree == ref.top1_agree == 1.0
    assert same.ppl_delta_pct == pytest.approx(0.0, abs=1e-4)
    assert ref.weight_bytes == same.weight_bytes > 0
    # the perplexity is HF's over the same positions
    lp = _hf_logprobs(hf_model, ids)
    nll = -lp.gather(1, torch.tensor(ids[1:])[:, None]).mean()
    assert ref.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_parse_config_types_and_errors():
    assert parse_config("none") == parse_config("") == {}
    assert parse_config("dtype=bfloat16, block_size=32,enable_prefix_caching=false,"
                        "max_model_len=none,gpu_memory_utilization=0.5,quantization=None") == {
        "dtype": "bfloat16", "block_size": 32, "enable_prefix_caching": False,
        "max_model_len": None, "gpu_memory_utilization": 0.5, "quantization": None}
    assert parse_config("max-num-seqs=4") == {"max_num_seqs": 4}
    with pytest.raises(ValueError, match=r"unknown config key 'bogus'.*dtype.*block_size"):
        parse_config("dtype=float32,bogus=1")
    with pytest.raises(ValueError, match="block_size.*int"):
        parse_config("block_size=big")
    with pytest.raises(ValueError, match="enforce_eager.*true/false"):
        parse_config("enforce_eager=maybe")
    with pytest.raises(ValueError, match="key=value"):
        parse_config("dtype")


def _byte_tokenizer(path) -> str:
    """A byte-level tokenizer of 256 ids (the tiny model's vocabulary), no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return str(path)


def test_cli_end_to_end(tiny, tmp_path, capsys):
    base, _ = tiny
    tok = _byte_tokenizer(tmp_path / "tok")
    out = tmp_path / "ppl.json"
    common = ["bench", "perplexity", "--model", base["model"], "--tokenizer", tok,
              "--device", "cpu"]
    rc = main([*common, "--max-tokens", "300", "--chunk-size", "128",
               "--configs", "dtype=float32", "dtype=bfloat16", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["config", "tokens", "perplexity", "Δppl"]
    assert [r.split()[0] for r in table[2:]] == ["dtype=float32", "dtype=bfloat16"]
    res = json.loads(out.read_text())["results"]
    assert [r["num_tokens"] for r in res] == [299, 299]
    assert res[0]["mean_kl"] == 0.0 and 0.0 < res[1]["mean_kl"] < 0.1
    assert 0.5 < res[1]["top1_agree"] <= 1.0
    assert res[1]["weight_bytes"] < 0.75 * res[0]["weight_bytes"]  # bf16 weights
    # the whole default text (~24k bytes) is longer than the tiny model's context of 512
    assert main([*common, "--configs", "none"]) == 2
    assert "--max-tokens 512" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["kv_eviction=streaming", 'early_exit_config={"threshold": 0.5}'])
def test_settings_the_tool_cannot_apply_are_refused(spec):
    from servelm.bench.perplexity import engine_args, parse_config
    with pytest.raises(ValueError, match="does not apply"):
        engine_args({}, parse_config(spec), spec, 100)
