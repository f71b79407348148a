"""SamplingParams validation (every bad field is a ValueError naming it) and child seeds."""
from __future__ import annotations

import pytest

from servelm.sampling_params import SamplingParams

NAN, INF = float("nan"), float("inf")

INVALID = {
    "n": [0, -1, 1.5, "2", None],
    "temperature": [-0.1, -1, NAN, INF, "1", None, 1e39, 1e5 + 1],
    "top_p": [0, 0.0, -0.5, 1.01, NAN, INF, None],
    "top_k": [-2, -10, 2.5, "5", None],
    "min_p": [-0.01, 1.01, NAN, INF, None],
    "presence_penalty": [-2.01, 2.01, NAN, INF, None],
    "frequency_penalty": [-2.5, 2.5, NAN, -INF, None],
    "repetition_penalty": [0, 0.0, -1.0, 2.01, NAN, INF, None, 1e-40, 0.009],
    "seed": [1.5, "3", 2**64, -2**63 - 1],
    "max_tokens": [0, -5, 2.0, "8"],
    "min_tokens": [-1, 1.5, None],
    "stop": [[""], ["ok", ""], [1], [None]],
    "stop_token_ids": [[-1], [1, -2], ["3"], [1.0]],
    "logprobs": [-1, 1.5, "2"],
    "prompt_logprobs": [-1, 0.5, "0"],
}


@pytest.mark.parametrize("name,value", [(k, v) for k, vs in INVALID.items() for v in vs],
                         ids=lambda x: repr(x)[:20])
def test_invalid_field_raises_value_error_naming_it(name, value):
    kwargs = {name: value}
    if name == "max_tokens":
        kwargs["min_tokens"] = 0
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens") as e:
        SamplingParams(min_tokens=9, max_tokens=8)
    assert "max_tokens" in str(e.value)
    SamplingParams(min_tokens=8, max_tokens=8)
    SamplingParams(min_tokens=100, max_tokens=None)


VALID = [
    dict(),
    dict(n=4, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0),
    dict(temperature=2.5, top_p=0.01, top_k=1, min_p=1.0),
    dict(presence_penalty=-2, frequency_penalty=2, repetition_penalty=2),
    dict(presence_penalty=2.0, frequency_penalty=-2.0, repetition_penalty=0.01),
    dict(seed=0), dict(seed=-2**63), dict(seed=2**64 - 1),
    dict(max_tokens=None), dict(max_tokens=1, min_tokens=1),
    dict(stop=["a", "\n\n"], stop_token_ids=[0, 5]),
    dict(logprobs=0, prompt_logprobs=0), dict(logprobs=20, prompt_logprobs=5),
]


@pytest.mark.parametrize("kw", VALID, ids=lambda k: ",".join(k) or "defaults")
def test_valid_params_accepted(kw):
    p = SamplingParams(**kw)
    for k, v in kw.items():
        assert getattr(p, k) == v


def test_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    assert SamplingParams(top_k=-1).top_k == 0
    # lists are copied, not shared with the caller
    stops = ["x"]
    p = SamplingParams(stop=stops)
    stops.append("y")
    assert p.stop == ["x"]


def test_greedy_and_needs_penalties():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy
    assert not SamplingParams().needs_penalties
    assert SamplingParams(presence_penalty=0.1).needs_penalties
    assert SamplingParams(frequency_penalty=-0.1).needs_penalties
    assert SamplingParams(repetition_penalty=1.1).needs_penalties


def test_child_seeds():
    p = SamplingParams(n=4, seed=1234, temperature=0.7, top_p=0.9, stop=["x"], max_tokens=33)
    kids = [p.child(i) for i in range(4)]
    assert all(k.n == 1 for k in kids)
    assert len({k.seed for k in kids}) == 4  # distinct
    assert [k.seed for k in kids] == [p.child(i).seed for i in range(4)]  # deterministic
    for k in kids:
        assert (k.temperature, k.top_p, k.stop, k.max_tokens) == (0.7, 0.9, ["x"], 33)
    assert p.n == 4 and p.seed == 1234  # parent unchanged
    # no seed: children stay unseeded
    q = SamplingParams(n=3)
    assert all(q.child(i).seed is None and q.child(i).n == 1 for i in range(3))
    # seeds near the top of the range wrap and stay valid
    top = SamplingParams(n=3, seed=2**64 - 1)
    assert [top.child(i).seed for i in range(3)] == [2**64 - 1, 0, 1]
    neg = SamplingParams(n=2, seed=-5)
    assert all(0 <= neg.child(i).seed < 2**64 for i in range(2))
    assert neg.child(0).seed != neg.child(1).seed


BOOL_INT_FIELDS = ["n", "top_k", "max_tokens", "min_tokens", "seed", "logprobs", "prompt_logprobs"]


@pytest.mark.parametrize("name", BOOL_INT_FIELDS)
def test_bool_is_not_an_integer(name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: True})


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "presence_penalty",
                                  "frequency_penalty", "repetition_penalty"])
def test_bool_is_not_a_number(name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: True})
