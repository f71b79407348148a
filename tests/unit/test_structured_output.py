"""Structured outputs without a model: params, the schema checks (against what xgrammar really
enforces), the compile manager, and the grammar logits processor against its matchers."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from servelm.sampling import AddedRequest, BatchUpdate, ProcessorContext
from servelm.sampling_params import SamplingParams
from servelm.structured_output import StructuredOutputsConfig, StructuredOutputsParams
from servelm.structured_output.schema_check import check_json_schema, check_regex

xgr = pytest.importorskip("xgrammar")

from servelm.structured_output.processor import GrammarLogitsProcessor, unpack_bitmask  # noqa: E402
from servelm.structured_output.xgrammar_backend import XgrammarBackend  # noqa: E402

# a character-level vocabulary: printable ASCII, a few multi-character tokens, and EOS last
_CHARS = [chr(c) for c in range(32, 127)] + ["\n", '{"', '":', "true", "false", "null", "ab"]
EOS = len(_CHARS)
VOCAB = EOS + 1


class CharTokenizer:
    """What XgrammarBackend reads from a tokenizer: a RAW vocabulary, no backend tokenizer."""

    eos_token_id = EOS

    def get_vocab(self):
        return {**{t: i for i, t in enumerate(_CHARS)}, "</s>": EOS}


@pytest.fixture(scope="module")
def backend():
    return XgrammarBackend(CharTokenizer(), VOCAB, [EOS], max_threads=1)


def _encode(s: str) -> list[int]:
    return [_CHARS.index(c) for c in s]


# ---- params ------------------------------------------------------------------------------
def test_params_exactly_one_constraint_and_limits():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=["a", ""])
    with pytest.raises(ValueError, match="characters"):
        StructuredOutputsParams(regex="a" * (256 * 1024 + 1))
    p = StructuredOutputsParams(json={"type": "object", "properties": {"b": {}, "a": {}}})
    assert list(json.loads(p.json)["properties"]) == ["b", "a"]  # order kept
    assert StructuredOutputsParams.from_dict(p.to_dict()) == p
    c = StructuredOutputsParams(choice=["x", "y"])
    assert hash(c) == hash(StructuredOutputsParams.from_dict(c.to_dict()))
    sp = SamplingParams(structured_outputs={"regex": "[0-9]+"})
    assert sp.structured_outputs == StructuredOutputsParams(regex="[0-9]+")
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs="json")


def test_config_parse():
    assert StructuredOutputsConfig.parse(None) == StructuredOutputsConfig()
    cfg = StructuredOutputsConfig.parse('{"backend": "xgrammar", "compile_timeout_s": 2}')
    assert cfg.compile_timeout_s == 2
    for bad in ({"backend": "outlines"}, {"nope": 1}, {"compile_timeout_s": 0}, "{x"):
        with pytest.raises(ValueError):
            StructuredOutputsConfig.parse(bad)


# ---- unsupported keywords: refused, and the supported ones really enforced -----------------
@pytest.mark.parametrize("schema", [
    {"not": {"type": "string"}},
    {"type": "object", "properties": {"a": {"if": {}, "then": {}}}},
    {"type": "array", "uniqueItems": True},
    {"type": "array", "contains": {"const": 1}},
    {"type": "object", "minProperties": 1},
    {"type": "object", "dependentRequired": {"a": ["b"]}},
    {"allOf": [{"type": "integer"}, {"minimum": 3}]},
    {"type": "string", "format": "credit-card"},
    {"type": "string", "pattern": "(?=a)b"},
    {"$defs": {"x": {"not": {}}}, "$ref": "#/$defs/x"},
    {"type": "array", "items": {"type": "object", "properties": {"q": {"format": "nope"}}}},
])
def test_unsupported_schema_keywords_are_refused(schema):
    with pytest.raises(ValueError, match="not supported"):
        check_json_schema(schema)
    with pytest.raises(ValueError):
        XgrammarBackend.validate(StructuredOutputsParams(json=schema))


def test_regex_non_regular_features_refused():
    for rx in ("(?!a)b", "(?<=a)b", r"(a)\1"):
        with pytest.raises(ValueError, match="lookarounds"):
            check_regex(rx)
    check_regex(r"[a-z]+\d{2}")


# (schema, instance it must refuse, instance it must accept): each keyword that check_json_schema
# lets through is one xgrammar enforces
ENFORCED = [
    ({"type": "string", "minLength": 3}, '"ab"', '"abc"'),
    ({"type": "string", "maxLength": 2}, '"abc"', '"ab"'),
    ({"type": "string", "pattern": "^[0-9]+$"}, '"a"', '"12"'),
    ({"type": "string", "format": "email"}, '"abc"', '"a@b.co"'),
    ({"type": "string", "format": "date"}, '"abc"', '"2024-01-02"'),
    ({"type": "string", "format": "uuid"}, '"abc"', '"123e4567-e89b-12d3-a456-426614174000"'),
    ({"type": "integer", "minimum": 5}, "3", "7"),
    ({"type": "integer", "exclusiveMaximum": 5}, "5", "4"),
    ({"type": "integer", "multipleOf": 3}, "4", "6"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 1}, "[1, 2]", "[1]"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, "[1]", "[1, 2]"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, "{}",
     '{"a": 1}'),
    ({"type": "object", "properties": {"a": {"type": "integer"}}}, '{"b": 1}', '{"a": 1}'),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"b": "x"}', '{"b": 1}'),
    ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, "true", "1"),
    ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, '"x"', "null"),
    ({"enum": ["x", 1]}, '"y"', "1"),
    ({"const": "x"}, '"y"', '"x"'),
    ({"type": ["string", "null"]}, "1", "null"),
    ({"$defs": {"x": {"type": "integer"}}, "$ref": "#/$defs/x"}, '"a"', "3"),
    ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
     "[1, 2]", '[1, "a"]'),
]


@pytest.mark.parametrize("schema,bad,good", ENFORCED)
def test_supported_keywords_are_enforced(backend, schema, bad, good):
    check_json_schema(schema)
    g = backend.compile(StructuredOutputsParams(json=schema))

    def ok(s: str) -> bool:
        m = g.matcher(-1)
        return m.accept_string(s) and m.is_completed()
    assert ok(good) and not ok(bad)


def test_validate_reports_syntax_errors():
    for p in (StructuredOutputsParams(regex="[a-"), StructuredOutputsParams(grammar="root ::= "),
              StructuredOutputsParams(json='{"type": "nope"}'), StructuredOutputsParams(json="{x")):
        with pytest.raises(ValueError, match="invalid structured-output|not valid JSON"):
            XgrammarBackend.validate(p)


def test_choice_with_quotes_and_newlines(backend):
    choices = ['say "hi"', "a\\b", "two\nlines", "ünï"]
    XgrammarBackend.validate(StructuredOutputsParams(choice=choices))
    g = backend.compile(StructuredOutputsParams(choice=choices[:3]))
    for c in choices[:3]:
        m = g.matcher(-1)
        assert m.accept_string(c) and m.is_completed()
    assert not g.matcher(-1).accept_string("say hi")


# ---- the compile manager -------------------------------------------------------------------
def _manager(timeout_s: float = 10.0):
    from servelm.structured_output.manager import GrammarManager
    mc = SimpleNamespace(hf_config=SimpleNamespace(vocab_size=VOCAB), eos_token_ids=(EOS,),
                         model="", tokenizer=None, load_format="dummy")
    return GrammarManager(StructuredOutputsConfig(compile_timeout_s=timeout_s), mc,
                          CharTokenizer())


def _req(rid: str, so: StructuredOutputsParams):
    return SimpleNamespace(request_id=rid, params=SamplingParams(structured_outputs=so),
                           grammar=None)


def test_manager_compiles_caches_and_fails_cleanly():
    mgr = _manager()
    try:
        so = StructuredOutputsParams(regex="[0-9]{2}")
        mgr.add(_req("a", so))
        mgr.add(_req("b", so))  # the same params: one compile
        mgr.add(_req("c", StructuredOutputsParams(grammar='root ::= "x" undefined_rule')))
        mgr.add(_req("d", StructuredOutputsParams(regex="x")))
        assert mgr.drop("d") and not mgr.drop("d")
        deadline = time.monotonic() + 30
        ready, failed = [], []
        while mgr.pending and time.monotonic() < deadline:
            mgr.wait(0.1)
            r, f = mgr.collect()
            ready += r
            failed += f
        assert sorted(r.request_id for r in ready) == ["a", "b"]
        assert ready[0].grammar is ready[1].grammar
        assert [r.request_id for r, _ in failed] == ["c"]
        assert "invalid structured-output grammar" in failed[0][1]
    finally:
        mgr.shutdown()


def test_manager_timeout_fails_the_request_not_the_engine(monkeypatch):
    slow = XgrammarBackend.compile

    def compile_slowly(self, params):
        time.sleep(0.5)
        return slow(self, params)
    monkeypatch.setattr(XgrammarBackend, "compile", compile_slowly)
    mgr = _manager(timeout_s=0.05)
    try:
        mgr.add(_req("slow", StructuredOutputsParams(regex="[a-z]{3}")))
        mgr.wait(0.2)  # returns at the timeout: nothing compiled
        ready, failed = mgr.collect()
        assert not ready and [r.request_id for r, _ in failed] == ["slow"]
        assert "did not compile within 0.05 s" in failed[0][1]
        assert not mgr.pending
        # the compile ran on and landed in the cache: the same grammar is then ready at once
        time.sleep(0.6)
        mgr.add(_req("again", StructuredOutputsParams(regex="[a-z]{3}")))
        ready, failed = mgr.collect()
        assert [r.request_id for r in ready] == ["again"] and not failed
    finally:
        mgr.shutdown()


# ---- the logits processor --------------------------------------------------------------------
def test_unpack_bitmask_matches_bits():
    rng = np.random.default_rng(0)
    for V in (1, 31, 32, 33, 100, 257):
        W = -(-V // 32)
        words = rng.integers(-2**31, 2**31, size=(3, W), dtype=np.int64).astype(np.int32)
        got = unpack_bitmask(torch.from_numpy(words), V)
        ref = np.array([[(int(words[r, t // 32]) >> (t % 32)) & 1 for t in range(V)]
                        for r in range(3)], dtype=bool)
        assert np.array_equal(got.numpy(), ref)


def _allowed(matcher, vocab: int) -> np.ndarray:
    bm = xgr.allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(bm, 0)
    return unpack_bitmask(bm, vocab)[0].numpy()


@pytest.fixture(scope="module")
def mask_service(backend):
    from servelm.structured_output.rows import stop_row
    from servelm.structured_output.service import MaskService
    words = -(-VOCAB // 32)
    svc = MaskService("xgrammar", backend.state(), words, stop_row(words, VOCAB, [EOS]))
    yield svc
    svc.close()
    assert svc.proc.returncode == 0


@pytest.fixture(params=["inline", "mask_process"])
def grammars(request, backend):
    """How the processor gets its grammars: compiled here, or in the mask process (the
    processor then keeps no matchers: the process fills the masks)."""
    if request.param == "inline":
        return backend.compile
    return request.getfixturevalue("mask_service").compile


def test_processor_masks_rows_like_their_matchers(backend, grammars):
    """Rows added, advanced by appended tokens, moved, removed; drafts; a terminated row."""
    ctx = ProcessorContext(max_rows=6, vocab_size=VOCAB, device=torch.device("cpu"),
                           eos_token_ids=(EOS,))
    proc = GrammarLogitsProcessor(ctx)
    p_num = StructuredOutputsParams(regex="[0-9]{2,4}")
    p_json = StructuredOutputsParams(json={
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    p_choice = StructuredOutputsParams(choice=["ab", "cd"])
    sp = SamplingParams()
    add = [AddedRequest(0, sp, [1], [], grammar=grammars(p_num)),
           AddedRequest(1, sp, [1], [], grammar=None),
           AddedRequest(2, sp, [1], _encode('{"ok": '), grammar=grammars(p_json)),  # resumed
           AddedRequest(3, sp, [1], [], grammar=grammars(p_choice))]
    rows = np.array([0, 1, 2, 3])
    proc.update(BatchUpdate(added=add, logits_rows=rows, logits_rows_t=torch.from_numpy(rows)))
    assert proc.is_active()
    refs = {0: backend.compile(p_num).matcher(-1), 2: backend.compile(p_json).matcher(-1),
            3: backend.compile(p_choice).matcher(-1)}
    for t in _encode('{"ok": '):
        assert refs[2].accept_token(t)
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    out = proc.apply(logits.clone())
    for i, row in enumerate(rows):
        if row in refs:
            allow = _allowed(refs[row], VOCAB)
            assert torch.equal(out[i][torch.from_numpy(allow)], logits[i][torch.from_numpy(allow)])
            assert torch.isinf(out[i][torch.from_numpy(~allow)]).all()
        else:
            assert torch.equal(out[i], logits[i])
    # step 2: rows append tokens; row 3 moves to 5, row 1 leaves; row 0 verifies 2 drafts
    # (one legal "12", then "1x": a refused draft); row 2 finishes its JSON and emits EOS
    appended = [(np.array([0, 2, 3]), torch.tensor(_encode("1") + _encode("true")[:1]
                                                   + _encode("a")))]
    for r, t in zip((0, 2, 3), appended[0][1].tolist()):
        refs[r].accept_token(t)
    # row 2 got "t", which is not "true"'s token: it may also spell t-r-u-e char by char
    lrows = np.array([0, 0, 0, 2, 5])
    bu = BatchUpdate(appended=appended, removed=[1], moved=[(3, 5)], logits_rows=lrows,
                     logits_rows_t=torch.from_numpy(lrows),
                     drafts=[(1, _encode("2")), (2, _encode("2x"))])
    proc.update(bu)
    refs[5] = refs.pop(3)
    logits = torch.randn(5, VOCAB)
    out = proc.apply(logits.clone())
    m0 = refs[0]
    expect = [_allowed(m0, VOCAB)]
    m0.accept_token(_encode("2")[0])
    expect.append(_allowed(m0, VOCAB))
    m0.rollback(1)
    expect.append(np.ones(VOCAB, dtype=bool))  # after the refused "x": anything
    expect += [_allowed(refs[2], VOCAB), _allowed(refs[5], VOCAB)]
    for i in range(5):
        allow = torch.from_numpy(expect[i])
        assert torch.equal(out[i][allow], logits[i][allow]), i
        assert torch.isinf(out[i][~allow]).all(), i
    # the drafts were rolled back: row 0's matcher is where its accepted tokens left it
    proc.update(BatchUpdate(logits_rows=lrows[:1], logits_rows_t=torch.from_numpy(lrows[:1])))
    out = proc.apply(logits[:1].clone())
    assert torch.equal(torch.isfinite(out[0]), torch.from_numpy(_allowed(m0, VOCAB)))


def test_processor_terminated_row_allows_only_stop_tokens(grammars):
    ctx = ProcessorContext(max_rows=2, vocab_size=VOCAB, device=torch.device("cpu"),
                           eos_token_ids=(EOS,))
    proc = GrammarLogitsProcessor(ctx)
    g = grammars(StructuredOutputsParams(choice=["ab"]))
    rows = np.array([0])
    proc.update(BatchUpdate(added=[AddedRequest(0, SamplingParams(), [1], [], grammar=g)],
                            logits_rows=rows, logits_rows_t=torch.from_numpy(rows)))
    proc.apply(torch.randn(1, VOCAB))
    # "ab" as one token, then EOS: the matcher terminates; ignore_eos would sample on
    proc.update(BatchUpdate(appended=[(rows, torch.tensor([_CHARS.index("ab")]))],
                            logits_rows=rows, logits_rows_t=torch.from_numpy(rows)))
    out = proc.apply(torch.randn(1, VOCAB))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [EOS]
    proc.update(BatchUpdate(appended=[(rows, torch.tensor([EOS]))], logits_rows=rows,
                            logits_rows_t=torch.from_numpy(rows)))
    out = proc.apply(torch.randn(1, VOCAB))
    if proc.service is None:
        assert proc.rows.matchers[0].is_terminated()
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [EOS]
