"""servelm.server.json_body: a body's longest string measured chunk by chunk; big bodies parsed
in slices give json.loads's result or refuse what it refuses, refuse shapes past their bounds,
and hand the event loop back while parsing."""
from __future__ import annotations

import asyncio
import json
import random

import pytest

from servelm.server.json_body import BodyShape, BodyShapeError, StringScan, loads_in_slices

UNBOUNDED = BodyShape(max_fields=10 ** 9, max_items=10 ** 9)


def _reference(raw: bytes):
    def no_constants(name):
        raise ValueError(name)
    try:
        return "ok", json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        return "error", type(e).__name__


def _sliced(raw: bytes, shape: BodyShape = UNBOUNDED):
    try:
        return "ok", asyncio.run(loads_in_slices(raw, shape))
    except BodyShapeError as e:
        return "shape", str(e)
    except (ValueError, RecursionError) as e:
        return "error", type(e).__name__


@pytest.mark.parametrize("raw", [
    b'{}', b' {\n} ', b'{"a":1}', b'{"a": [1, 2, {"b": [3]}], "c": {"d": "e", "f": [ ]}}',
    b'{"a": [] , "b": {} }', b'{"a":1, "a":2}', b'{"a":"\\u00e9\\n\\"\\\\"}',
    b'{"a": [1.5e3, -0, true, false, null, "x", 100000000000000000000000]}',
    b'\n\t{"k":\r\n[ 1 ,\n2 ] }\n', b'{"a":[[[[]]]], "b": {"c": {"d": {}}}}',
])
def test_same_objects_as_json_loads(raw):
    assert _sliced(raw) == _reference(raw)


@pytest.mark.parametrize("raw", [
    b'{"a":1,}', b'{"a" 1}', b'{"a":[1,]}', b'{"a":{"b":1,}}', b'{"a":NaN}', b'{"a":[Infinity]}',
    b'{"a":{"b":-Infinity}}', b'{"a":1} x', b'{"a":1}{', b'{"a":"\x01"}', b'{"a": [1 2]}',
    b'{"a": {"b" 2}}', b'{', b'{"a":', b'{"a":[', b'{"a":{"b":', b'{"a":[1', b"{'a': 1}",
    b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b'{"a": "\xff"}', b'{1: 2}',
])
def test_refuses_what_json_loads_refuses(raw):
    assert _reference(raw)[0] == "error"
    # (nesting past 128 levels is refused as a shape: json.loads runs out of recursion)
    assert _sliced(raw)[0] in ("error", "shape"), _sliced(raw)


def test_random_objects():
    rng = random.Random(0)

    def value(depth: int = 0):
        t = rng.random()
        if depth > 3 or t < 0.4:
            return rng.choice([1, -2.5, 'q\u00e9"\\\n', None, True, "", 10 ** 30, "\U0001f600"])
        if t < 0.7:
            return [value(depth + 1) for _ in range(rng.randint(0, 5))]
        return {f"k{rng.randint(0, 9)}": value(depth + 1) for _ in range(rng.randint(0, 5))}

    for _ in range(300):
        obj = {f"f{i}": value() for i in range(rng.randint(0, 6))}
        raw = json.dumps(obj, indent=rng.choice([None, 1]),
                         ensure_ascii=rng.random() < 0.5).encode()
        assert _sliced(raw) == ("ok", obj), raw


def test_shape_bounds():
    shape = BodyShape(max_fields=4, max_items=10)
    assert _sliced(json.dumps({f"k{i}": 0 for i in range(4)}).encode(), shape)[0] == "ok"
    assert _sliced(b'{"a": 1, "a": 2, "b": 3, "c": 4, "d": 5, "a": 6}', shape)[0] == "ok"
    kind, msg = _sliced(json.dumps({f"k{i}": 0 for i in range(5)}).encode(), shape)
    assert kind == "shape" and "more than 4 fields" in msg
    for field in ([0] * 11, {str(i): 0 for i in range(11)}):
        kind, msg = _sliced(json.dumps({"prompt": field}).encode(), shape)
        assert kind == "shape" and "'prompt'" in msg and "10 items" in msg
    assert _sliced(json.dumps({"prompt": [[0] * 10] * 10}).encode(), shape)[0] == "ok"
    # at every depth: token-id lists (counted from their commas before parsing), objects
    for inner in ([[0] * 10, [1] * 11], [{"m": {str(i): 0 for i in range(11)}}], [["a"] * 11]):
        kind, msg = _sliced(json.dumps({"messages": inner}).encode(), shape)
        assert kind == "shape" and "'messages'" in msg, (inner, kind, msg)
    assert _sliced(b'{"p": [[1,,2]]}', shape)[0] == "error"  # the fast path still validates
    kind, msg = _sliced(b'{"p": ' + b"[" * 129 + b"]" * 129 + b"}", shape)
    assert kind == "shape" and "deeper than 128" in msg
    # (items parsed one by one count; token-id lists are parsed whole and do not)
    assert _sliced(json.dumps({"a": [0] * 10, "b": [0] * 10, "c": [0] * 10}).encode(),
                   shape)[0] == "ok"
    kind, msg = _sliced(json.dumps({"a": ["x"] * 10, "b": ["x"] * 10, "c": ["x"] * 10}).encode(),
                        shape)
    assert kind == "shape" and "in all its fields" in msg
    kind, msg = _sliced(b"[1, 2]", shape)
    assert kind == "shape" and "JSON object" in msg
    with pytest.raises(BodyShapeError) as e:
        asyncio.run(loads_in_slices(json.dumps({"stop": ["x"] * 11}).encode(), shape))
    assert e.value.param == "stop"


def test_hands_the_event_loop_back():
    """While 200k items parse, a task waiting on a 1 ms timer runs many times."""
    raw = json.dumps({"prompt": ["ab"] * 200_000}).encode()

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0)
                ticks += 1
        t = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        obj = await loads_in_slices(raw, UNBOUNDED)
        done.set()
        await t
        return obj, ticks

    obj, ticks = asyncio.run(main())
    assert obj == {"prompt": ["ab"] * 200_000}
    assert ticks >= 10, ticks


def longest_string_bytes(buf: bytes) -> "int | None":
    """A whole body's longest string, in one piece (None: the scan gave up)."""
    scan = StringScan()
    scan.feed(buf)
    return None if scan.gave_up else scan.longest


def test_longest_string_scan():
    for obj in ({"a": "xyz", "b": "q" * 50}, {"p": 'say "hi" \\ and \\"'}, {"k": [1, 2]},
                {"a": "\u00e9" * 10, "b": ""}):
        raw = json.dumps(obj).encode()
        strings = list(obj) + [v for v in obj.values() if isinstance(v, str)]  # keys too
        want = max(len(json.dumps(v)) - 2 for v in strings)
        assert longest_string_bytes(bytearray(raw)) == want
    assert longest_string_bytes(b'["' + b'a","' * 200_000 + b'a"]') is None  # too many quotes


def test_string_scan_across_chunks():
    """Fed in pieces cut anywhere (inside escapes, between backslashes and their quote), the scan
    finds what it finds in one piece; a string still open counts as far as it has arrived."""
    raw = json.dumps({"p": 'a\\"b' + "x" * 40 + '\\\\', "q": ["\\", 'say "hi"'], "r": "z" * 7}
                     ).encode()
    want = longest_string_bytes(raw)
    assert want == len(json.dumps('a\\"b' + "x" * 40 + '\\\\')) - 2
    for i in range(len(raw) + 1):
        for j in range(i, len(raw) + 1, 5):
            scan = StringScan()
            for part in (raw[:i], raw[i:j], raw[j:]):
                scan.feed(part)
            assert not scan.gave_up and scan.longest == want, (i, j)
    scan = StringScan()
    scan.feed(b'{"a": "xy", "p": "')
    scan.feed(b"q" * 100)
    assert scan.open_at is not None and scan.longest == 100
