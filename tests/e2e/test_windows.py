"""Sliding-window attention (Mistral), and Gemma 2 / Gemma 3 (interleaved local and global
layers, logit soft-capping, four norms a layer, scaled embedding, q/k norms, per-type rope):
greedy output token-identical to transformers in fp32 with logprobs close, for prompts and
generations longer than the window, under chunked prefill, prefix hits, preemption and tensor
parallelism; the context is no longer capped at the window."""
from __future__ import annotations

import pytest

from tests.conftest import assert_all_blocks_free, make_engine, random_prompts, run_to_completion
from tests.e2e.test_engine_vs_hf import GREEDY, LENGTHS, check, check_engine, hf_refs

WINDOWED = ["mistral-window", "gemma2", "gemma3"]



@pytest.mark.parametrize("arch", WINDOWED)
def test_windowed_greedy_matches_hf(tiny_model_factory, arch):
    d, model = tiny_model_factory(arch)
    prompts = random_prompts(8, LENGTHS, seed=3)  # up to 120 tokens: 5x the windows
    eng = make_engine(d, max_num_batched_tokens=40)  # long prompts in chunks
    assert eng.core.config.model.max_model_len == 512  # not capped at the window
    outs = run_to_completion(eng, prompts, GREEDY)
    check(outs, hf_refs(model, prompts))
    assert_all_blocks_free(eng)


def test_gemma_prefix_hits_and_preemption(tiny_model_factory):
    d, model = tiny_model_factory("gemma2")
    base = random_prompts(1, [36], seed=21)[0]
    prompts = [base + p for p in random_prompts(5, [4, 10, 18, 25, 31], seed=22)]
    eng = make_engine(d, num_gpu_blocks_override=50, kv_cache_memory=None, max_num_seqs=5)
    outs = run_to_completion(eng, prompts, GREEDY)
    check(outs, hf_refs(model, prompts))
    stats = eng.core.scheduler.stats()
    assert stats.prefix_cache_hits > 0 and stats.num_preemptions > 0
    assert_all_blocks_free(eng)


def test_gemma3_tensor_parallel_matches_hf(tiny_model_factory):
    d, model = tiny_model_factory("gemma3")
    check_engine(d, model, random_prompts(4, LENGTHS, seed=30), tensor_parallel_size=2,
                 max_num_batched_tokens=40)


def test_backend_without_windows_is_refused(tiny_model_factory):
    from servelm.attention.backend import AttentionBackend
    from servelm.config import EngineArgs
    from servelm.models.llama import LayerOptions, LlamaArgs, LlamaAttention
    from servelm.loader import load_hf_config

    class NoWindows(AttentionBackend):
        name = "nowindows"

        def write_kv(self, *a):
            raise AssertionError

        def forward(self, *a, **k):
            raise AssertionError
    d, _ = tiny_model_factory("mistral-window")
    a = LlamaArgs.from_hf(load_hf_config(d, "safetensors"))
    assert a.sliding_window == 24
    with pytest.raises(ValueError, match="attention_backend='torch'"):
        LlamaAttention(a, LayerOptions(NoWindows()), "layers.0.self_attn")
    assert EngineArgs(model=d, device="cpu").create_engine_config().attention_backend == "auto"


def test_window_blocks_are_released(tiny_model_factory):
    """Mistral, window 24, blocks of 4: three requests of 40 + 64 tokens would need 78 blocks
    held at once; with blocks before each window released they run side by side in 40 (no
    preemption), and the output is still transformers'."""
    from servelm import SamplingParams
    d, model = tiny_model_factory("mistral-window")
    prompts = random_prompts(3, [40], seed=41)
    eng = make_engine(d, num_gpu_blocks_override=41, kv_cache_memory=None,
                      max_num_batched_tokens=16)
    kv = eng.core.scheduler.kv
    assert kv.window == 24 and kv.num_blocks == 40  # (block 0: the null block)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=2)
    outs = run_to_completion(eng, prompts, params)
    check(outs, hf_refs(model, prompts, 64))
    stats = eng.core.scheduler.stats()
    assert stats.num_preemptions == 0
    assert kv.num_window_freed >= 3 * (104 - 24 - 2 * 4) // 4
    assert_all_blocks_free(eng)


def test_gemma_pipeline_stages_match_hf(tiny_model_factory):
    """Two stages: the embedding scale on the first, the final soft-cap on the last."""
    d, model = tiny_model_factory("gemma2")
    check_engine(d, model, random_prompts(4, LENGTHS, seed=7), pipeline_parallel_size=2,
                 max_num_batched_tokens=40)


def test_gemma3_multimodal_checkpoint_served_text_only(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (language model under language_model.,
    a vision tower beside it): its language model serves text, token-identical to the whole
    transformers model on text-only prompts; the vision weights are not loaded."""
    import torch
    import transformers as tf

    from tests.conftest import TINY
    torch.manual_seed(5)
    text = {k: v for k, v in TINY.items()
            if k not in ("tie_word_embeddings", "eos_token_id", "bos_token_id")}
    text.update(num_hidden_layers=6, head_dim=16, sliding_window=20, query_pre_attn_scalar=16,
                pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=255, boi_token_index=253, eoi_token_index=254,
                          eos_token_id=None)
    model = tf.Gemma3ForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path)
    prompts = random_prompts(4, LENGTHS, seed=3, vocab=250)
    eng = make_engine(str(tmp_path), max_num_batched_tokens=40)
    lm = eng.core.executor.runner.model
    assert type(lm).__name__ == "GemmaForCausalLM"
    assert not any("vision" in n for n, _ in lm.named_parameters())
    check(run_to_completion(eng, prompts, GREEDY), hf_refs(model, prompts))


@pytest.mark.parametrize("spec", [{"method": "ngram", "num_speculative_tokens": 3,
                                   "prompt_lookup_max": 3},
                                  {"method": "layer_skip", "draft_layers": 1,
                                   "num_speculative_tokens": 2}])
def test_windowed_speculative_decoding_is_exact(tiny_model_factory, spec):
    """Verification's multi-token queries see the same windows (Gemma 2: local and global
    layers, soft-capping): output still transformers'."""
    d, model = tiny_model_factory("gemma2")
    prompts = random_prompts(4, LENGTHS, seed=7)
    eng = make_engine(d, max_num_batched_tokens=40, speculative_config=spec)
    check(run_to_completion(eng, prompts, GREEDY), hf_refs(model, prompts))
    assert eng.core.scheduler.stats().spec_num_drafts > 0


def test_released_entries_leave_the_runners_tables(tiny_model_factory):
    """The runner's block table stops pointing released (out-of-window) entries at blocks
    other requests may reuse: they read the null block, whose KV stays zeros."""
    from servelm import SamplingParams
    from servelm.core.kv_cache import NULL_BLOCK
    d, _ = tiny_model_factory("mistral-window")
    eng = make_engine(d, num_gpu_blocks_override=41, kv_cache_memory=None)
    eng.add_request("r", random_prompts(1, [60], seed=3)[0],
                    SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    runner, req = eng.core.executor.runner, eng.core.scheduler.requests["r"]
    for _ in range(30):
        eng.step()
    row = runner.batch.row_of["r"]
    assert req.num_null_blocks > 5
    assert (runner.batch.block_table[row, :req.num_null_blocks] == NULL_BLOCK).all()
    assert list(runner.batch.block_table[row, req.num_null_blocks:len(req.block_ids)]) == \
        req.block_ids[req.num_null_blocks:]
    while eng.has_unfinished_requests():
        eng.step()


def test_window_longer_than_the_context_is_dropped(tiny_model_factory):
    """max_model_len within the window: it can never mask a key, so the model is built without
    it (no window code path, no released blocks)."""
    d, _ = tiny_model_factory("mistral-window")
    eng = make_engine(d, max_model_len=20)
    assert eng.core.executor.runner.model.layers[0].self_attn.window == 0
    assert eng.core.scheduler.kv.window == 0
