"""Early exit (CALM with state propagation) against an independent reference: transformers'
decoder layers stepped one by one in a plain loop (the prompt through the whole model, then each
output token layer by layer: a confident token takes that layer's logits, and the later layers
still run on its exit state so their KV exists), greedy in fp32 on a tiny Llama."""
from __future__ import annotations

import inspect
from collections import Counter

import pytest
import torch

from servelm import SamplingParams
from tests.conftest import assert_all_blocks_free, make_engine, random_prompts, run_to_completion
from tests.e2e.test_engine_vs_hf import check

MAX_NEW = 24
STATE_THRESHOLD = 0.8  # cosine similarity of the stream around a layer (CALM's saturation)


def _cache_kw(fn) -> str:
    # (transformers 5.2x renames past_key_values to cache)
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def _confidence(logits: torch.Tensor, criterion: str) -> float:
    p = torch.softmax(logits.float(), -1)
    top = p.topk(2).values
    return float(top[0] if criterion == "max_prob" else top[0] - top[1])


@torch.no_grad()
def hf_early_exit_greedy(model, prompt, max_new, threshold, candidates, criterion="max_prob"):
    """(token ids, logprobs, exit layer of each output token after the first: None = none)."""
    from transformers import DynamicCache
    cache = DynamicCache()
    m = model.model
    types = getattr(model.config, "layer_types", None)  # Gemma 3: a rope per layer type
    per_type = "layer_type" in inspect.signature(m.rotary_emb.forward).parameters
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2

    def head(x):
        logits = model.lm_head(m.norm(x))
        return torch.tanh(logits / cap) * cap if cap else logits

    o = model(input_ids=torch.tensor([prompt]), use_cache=True,
              **{_cache_kw(model.forward): cache})
    lp = torch.log_softmax(o.logits[0, -1].float(), -1)
    t = int(lp.argmax())
    ids, lps, exits = [t], [float(lp[t])], []
    layer_kw = _cache_kw(m.layers[0].forward)
    for pos in range(len(prompt), len(prompt) + max_new - 1):
        h = m.embed_tokens(torch.tensor([[t]]))
        position_ids = torch.tensor([[pos]])
        pes = ({k: m.rotary_emb(h, position_ids, k) for k in set(types)} if per_type
               else m.rotary_emb(h, position_ids))
        state, logits, exit_at = None, None, None
        for n, layer in enumerate(m.layers, start=1):
            before = h
            pe = pes[types[n - 1]] if per_type else pes
            y = layer(h if state is None else state, attention_mask=None,
                      position_ids=position_ids, use_cache=True, position_embeddings=pe,
                      **{layer_kw: cache})
            y = y[0] if isinstance(y, tuple) else y
            if state is not None:
                continue  # an exited token: this layer ran for its KV only
            h = y
            if n in candidates:
                lg = head(h)[0, -1]
                conf = (float(torch.nn.functional.cosine_similarity(h[0, -1], before[0, -1],
                                                                      dim=0))
                        if criterion == "state" else _confidence(lg, criterion))
                if conf >= threshold:
                    state, logits, exit_at = h, lg, n
        if logits is None:
            logits = head(h)[0, -1]
        lp = torch.log_softmax(logits.float(), -1)
        t = int(lp.argmax())
        ids.append(t)
        lps.append(float(lp[t]))
        exits.append(exit_at)
    return ids, lps, exits


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def llama4(tiny_model_factory):
    return tiny_model_factory("llama4")


def _exit_counts(refs) -> dict[int, int]:
    """The reference's exited tokens by exit layer (what the engine's counters must say)."""
    return dict(Counter(e for _, _, ex in refs for e in ex if e is not None))


def _check(outs, refs):
    """check (test_engine_vs_hf) on the reference's (tokens, logprobs)."""
    check(outs, [(ids, lps) for ids, lps, _ in refs])


@pytest.mark.parametrize("criterion,threshold", [("max_prob", 0.15), ("margin", 0.06),
                                                 ("state", STATE_THRESHOLD)])
def test_early_exit_matches_reference(llama4, criterion, threshold):
    d, model = llama4
    prompts = random_prompts(4, (5, 17, 30, 9), seed=21)
    refs = [hf_early_exit_greedy(model, p, MAX_NEW, threshold, (1, 2, 3), criterion)
            for p in prompts]
    exits = [e for _, _, ex in refs for e in ex]
    assert any(e is not None for e in exits) and any(e is None for e in exits)
    eng = make_engine(d, early_exit_config={"threshold": threshold, "min_layer": 1,
                                            "criterion": criterion})
    outs = run_to_completion(eng, prompts, GREEDY)
    _check(outs, refs)
    # the counters: tokens that exited, by layer, as the reference's
    want = _exit_counts(refs)
    assert eng.stats().early_exit_tokens == want
    assert_all_blocks_free(eng)
    eng.core.shutdown()


def test_threshold_above_one_is_the_plain_engine(llama4):
    d, _ = llama4
    prompts = random_prompts(3, (6, 25, 12), seed=22)
    plain = make_engine(d)
    want = run_to_completion(plain, prompts, GREEDY)
    plain.core.shutdown()
    eng = make_engine(d, early_exit_config='{"threshold": 1.5, "exit_layers": [2]}')
    got = run_to_completion(eng, prompts, GREEDY)
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert eng.stats().early_exit_tokens == {}
    eng.core.shutdown()


def test_every_token_exiting_skips_the_later_layers(llama4):
    """Threshold 0: every output token exits after layer 1; the other layers only write KV,
    and the result is still the reference's."""
    d, model = llama4
    prompts = random_prompts(2, (8, 19), seed=23)
    refs = [hf_early_exit_greedy(model, p, MAX_NEW, 0.0, (1,)) for p in prompts]
    eng = make_engine(d, early_exit_config={"threshold": 0.0, "exit_layers": [1]})
    _check(run_to_completion(eng, prompts, GREEDY), refs)
    assert eng.stats().early_exit_tokens == {1: 2 * (MAX_NEW - 1)}
    eng.core.shutdown()


@pytest.mark.parametrize("cfg,match", [
    ({"min_layer": 2}, "needs a 'threshold'"),
    ({"threshold": 0.9, "layers": [1]}, "unknown key"),
    ({"threshold": 0.9, "criterion": "entropy"}, "criterion must be one of"),
    ({"threshold": 0.9, "min_layer": 4}, "no exit layer before"),
    ({"threshold": -1}, "threshold must be a number"),
    ("{not json", "not valid JSON"),
])
def test_early_exit_config_refused(llama4, cfg, match):
    d, _ = llama4
    with pytest.raises(ValueError, match=match):
        make_engine(d, early_exit_config=cfg)


def test_early_exit_under_tensor_parallelism(llama4):
    """Every rank holds the same gathered logits, so the ranks decide alike: TP=2 (gloo) gives
    the reference's tokens and exits."""
    d, model = llama4
    prompts = random_prompts(2, (7, 22), seed=24)
    refs = [hf_early_exit_greedy(model, p, MAX_NEW, 0.15, (1, 2, 3)) for p in prompts]
    eng = make_engine(d, tensor_parallel_size=2,
                      early_exit_config={"threshold": 0.15, "min_layer": 1})
    try:
        _check(run_to_completion(eng, prompts, GREEDY), refs)
        assert eng.stats().early_exit_tokens == _exit_counts(refs)
    finally:
        eng.core.shutdown()


def test_candidates_from_min_layer_and_exit_layers():
    from servelm.early_exit import parse_early_exit_config
    cfg = parse_early_exit_config({"threshold": 0.5, "min_layer": 2})
    assert cfg.candidates(4) == (2, 3)
    cfg = parse_early_exit_config({"threshold": 0.5, "min_layer": 3, "exit_layers": [1, 3, 4]})
    assert cfg.candidates(4) == (3,)  # both bounds apply; the last layer is no exit


class _EagerPieces:
    """A PiecewiseGraph whose pieces run eagerly (no CUDA here): the same buffers, padding rows
    and host decisions as the graphs' replays."""

    ran: set = set()  # (kind, i) of every piece run, over all keys

    def __init__(self, pieces):
        self.pieces = pieces

    def capture(self, input_ids, positions, meta, pool):
        self.inputs = (input_ids, positions, meta)

    def replay(self):
        def call(kind, i):
            self.ran.add((kind, i))
            return getattr(self.pieces, kind)(i)(*self.inputs)
        return self.pieces.run(call)


def _piecewise(eng, max_bs=8):
    """The engine's early-exit steps through early_exit/graphs.py's ExitGraphs (batches padded
    to its sizes), pieces run eagerly."""
    from servelm.early_exit.graphs import ExitGraphs
    from servelm.early_exit.pieces import ExitPieces
    r = eng.core.executor.runner
    pieces = ExitPieces(r.model, r.kv_caches, r.config.early_exit, max_bs, r.device, r.dtype)
    piecewise = type("Pieces", (_EagerPieces,), {"ran": set()})  # (a set of this engine's)
    graphs = type("EagerExitGraphs", (ExitGraphs,), {"piecewise": piecewise})(
        pieces, max_bs, r.max_blocks_per_seq, r.device, r.config.model.max_model_len)
    r.exit_graphs = graphs
    return graphs


@pytest.mark.parametrize("criterion,threshold,cands", [
    ("max_prob", 0.15, (1, 2, 3)), ("state", STATE_THRESHOLD, (1, 2, 3)),
    ("margin", 0.0, (1, 3)),  # every token exits after layer 1: the tail of candidate 1
])
def test_piecewise_step_matches_reference(llama4, criterion, threshold, cands):
    """The step cut into pieces for CUDA graphs (early_exit/pieces.py), batches of 4, 2 and 1
    (the torch reference attention has no padding rows; the CUDA test has them): the
    reference's tokens, logprobs and exits."""
    d, model = llama4
    prompts = random_prompts(4, (5, 17, 30, 11), seed=25)
    lens = (MAX_NEW, MAX_NEW - 4, MAX_NEW - 12, MAX_NEW - 12)
    refs = [hf_early_exit_greedy(model, p, n, threshold, cands, criterion)
            for p, n in zip(prompts, lens)]
    eng = make_engine(d, early_exit_config={"threshold": threshold, "exit_layers": list(cands),
                                            "criterion": criterion})
    graphs = _piecewise(eng)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0)
              for n in lens]
    _check(run_to_completion(eng, prompts, params), refs)
    assert {k[0] for k in graphs.graphs} == {4, 2, 1}
    # every segment ran, and tails after candidates 2 and 3 (some steps' rows had all exited);
    # at threshold 0 every row exits at candidate 1: its tail only
    assert graphs.piecewise.ran >= ({("segment", 0), ("tail", 1)} if threshold == 0 else
                                    {("segment", i) for i in range(4)} | {("tail", 3)})
    want = _exit_counts(refs)
    assert want and eng.stats().early_exit_tokens == want
    assert_all_blocks_free(eng)
    eng.core.shutdown()


# thresholds where, on these tiny random models, some tokens exit and some do not, or tokens
# exit after different layers (found with the reference; a tied head is confident early)
GEMMA_CASES = {"gemma2": (("max_prob", 0.9), ("state", 0.8)),
               "gemma3": (("max_prob", 0.95), ("state", 0.92))}


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_early_exit_matches_reference(tiny_model_factory, arch):
    """Gemma 2 / 3 (extra norms around attention and the MLP, embedding scale, soft-caps, a rope
    per layer type) exit and propagate through the same layer protocol: the reference's tokens,
    logprobs and exits. Contexts stay inside the 20-token window (the reference loop passes no
    masks)."""
    d, model = tiny_model_factory(arch)
    L = model.config.num_hidden_layers
    prompts = random_prompts(3, (5, 8, 6), seed=26)
    new = 10
    for criterion, thr in GEMMA_CASES[arch]:
        refs = [hf_early_exit_greedy(model, p, new, thr, tuple(range(1, L)), criterion)
                for p in prompts]
        exits = [e for _, _, ex in refs for e in ex]
        assert len(set(exits)) > 1  # not all alike: the case tests something
        eng = make_engine(d, early_exit_config={"threshold": thr, "criterion": criterion})
        sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True, logprobs=0)
        _check(run_to_completion(eng, prompts, sp), refs)
        assert eng.stats().early_exit_tokens == _exit_counts(refs)
        assert_all_blocks_free(eng)
        eng.core.shutdown()
