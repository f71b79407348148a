"""Cascade inference: the small model answers, the unsure answers go to the large model. Routing
is checked exactly against each model run alone, on tiny models (one made confident and one
unsure by construction, and one whose requests split around the threshold)."""
from __future__ import annotations

import pytest
import torch

from servelm import SamplingParams
from servelm.cascade import CascadeLLM, confidence
from tests.conftest import random_prompts

ARGS = dict(skip_tokenizer_init=True, device="cpu", dtype="float32", kv_cache_memory=1 << 24,
            block_size=4)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _variant(tiny_model_factory, tmp_path, name: str, head_scale: float) -> str:
    """The tiny Llama with its lm_head scaled: x50 makes every distribution peaked (confident),
    x0 uniform (unsure)."""
    import transformers as tf
    d, model = tiny_model_factory("llama")
    m = tf.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        m.lm_head.weight.mul_(head_scale)
    out = tmp_path / name
    m.save_pretrained(out)
    return str(out)


def _alone(model_dir: str, prompts, params):
    from servelm import LLM
    llm = LLM(model_dir, **ARGS)
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.core.shutdown()
    return outs


def test_escalates_exactly_the_unsure_requests(tiny_model_factory):
    small, _ = tiny_model_factory("llama")
    large, _ = tiny_model_factory("llama4")
    prompts = random_prompts(8, (5, 9, 14, 20, 7, 11, 30, 3), seed=41)
    lp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    small_outs = _alone(small, prompts, lp)
    conf = [confidence(o.outputs[0], "mean_prob") for o in small_outs]
    threshold = sorted(conf)[4]  # four below it, four at or above
    large_outs = _alone(large, prompts, GREEDY)
    cascade = CascadeLLM(small, large, threshold, **ARGS)
    res = cascade.generate(prompts, GREEDY)
    for i, r in enumerate(res):
        assert r.confidence == pytest.approx(conf[i], rel=1e-9)
        want = "large" if conf[i] < threshold else "small"
        assert r.model == want
        ref = (large_outs if want == "large" else small_outs)[i].outputs[0].token_ids
        assert r.output.outputs[0].token_ids == ref
        assert r.output.outputs[0].logprobs is None  # not asked for
        assert (r.small_tokens, r.large_tokens) == (12, 12 if want == "large" else 0)
    assert (cascade.num_requests, cascade.num_escalated) == (8, 4)
    for llm in (cascade.small, cascade.large):
        assert llm.engine.core.scheduler.kv.usage == 0.0
    cascade.shutdown()


def test_confident_and_unsure_models(tiny_model_factory, tmp_path):
    large, _ = tiny_model_factory("llama4")
    peaked = _variant(tiny_model_factory, tmp_path, "peaked", 50.0)
    flat = _variant(tiny_model_factory, tmp_path, "flat", 0.0)
    prompts = random_prompts(4, (6, 10, 15, 21), seed=42)
    for small, want in ((peaked, "small"), (flat, "large")):
        cascade = CascadeLLM(small, large, 0.5, criterion="min_prob", **ARGS)
        res = cascade.generate(prompts, GREEDY)
        assert [r.model for r in res] == [want] * 4
        cascade.shutdown()


@pytest.mark.parametrize("kw,match", [
    (dict(threshold=-0.5), "threshold must be a number"),
    (dict(threshold=0.5, criterion="entropy"), "criterion must be one of"),
])
def test_cascade_settings_refused(tiny_model_factory, kw, match):
    small, _ = tiny_model_factory("llama")
    with pytest.raises(ValueError, match=match):
        CascadeLLM(small, small, **kw, **ARGS)


def test_cascade_needs_one_vocabulary(tiny_model_factory, tmp_path):
    import transformers as tf

    from tests.conftest import TINY
    small, _ = tiny_model_factory("llama")
    other = tmp_path / "vocab300"
    tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**TINY, "vocab_size": 300})
                                        ).save_pretrained(other)
    with pytest.raises(ValueError, match="share a vocabulary"):
        CascadeLLM(small, str(other), 0.5, **ARGS)


def test_cascade_refuses_n_above_1(tiny_model_factory):
    small, _ = tiny_model_factory("llama")
    cascade = CascadeLLM(small, small, 0.5, **ARGS)
    with pytest.raises(ValueError, match="n must be 1"):
        cascade.generate([[1, 2, 3]], SamplingParams(n=2, max_tokens=4))
    cascade.shutdown()
