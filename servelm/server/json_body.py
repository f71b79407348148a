"""Big request bodies: their strings measured as they arrive, and parsed a piece at a time,
with bounds on their shape.

``json.loads`` holds the GIL for the whole body: in the API process that is the event loop's
thread, or a thread beside it that still shuts it out. A 14 MB body of a million fields took
1.8 s to parse on the 2-core CPU machine, and no other request moved meanwhile. Bodies over
1 MiB are therefore parsed here item by item at every depth (strings, numbers and arrays of
numbers by the standard decoder, at C speed), handing the event loop back every ~2 ms; and a
body with more fields than any request has, an array or object with more items than any
request can use, or nesting past _MAX_DEPTH, is refused (ValueError naming the field) as soon
as the parse gets there."""
from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from json.decoder import scanstring  # the C scanner where CPython has it
from typing import Any, Optional

_WS = re.compile(r"[ \t\n\r]*")
_SLICE_S = 0.002  # the longest the parse holds the event loop between pauses
_CHECK_EVERY = 256  # items parsed between looks at the clock
_MAX_DEPTH = 128  # arrays and objects within one another (json.loads itself allows ~1000)
# an array of numbers only (token ids): the one container parsed whole, its size known first
_NUMBERS = re.compile(r"\[[0-9eE+\-.,\s]*\]")


@dataclass(frozen=True)
class BodyShape:
    """The most a request body may hold: ``max_fields`` top-level fields, ``max_items`` items
    in any one array or object (prompts, token ids, messages, logit_bias...), and twice that
    parsed one by one over the whole body (arrays of numbers are parsed whole: not counted)."""
    max_fields: int = 256
    max_items: int = 1 << 16


class BodyShapeError(ValueError):
    """A body beyond its BodyShape; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def reject_constant(name: str) -> None:
    """json's parse_constant: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


class _Parser:
    def __init__(self, text: str, shape: BodyShape) -> None:
        self.s, self.shape = text, shape
        self.dec = json.JSONDecoder(parse_constant=reject_constant)
        self.items = 0
        self.last = time.perf_counter()

    def ws(self, i: int) -> int:
        return _WS.match(self.s, i).end()

    def expect(self, i: int, chars: str, what: str) -> str:
        c = self.s[i:i + 1]
        if not c or c not in chars:
            raise json.JSONDecodeError(f"Expecting {what}", self.s, i)
        return c

    def leaf(self, i: int) -> tuple[Any, int]:
        try:
            return self.dec.raw_decode(self.s, i)
        except StopIteration as e:  # (raw_decode maps this; scan_once may not)
            raise json.JSONDecodeError("Expecting value", self.s, e.value) from None

    def key(self, i: int) -> tuple[str, int]:
        self.expect(i, '"', "property name enclosed in double quotes")
        k, i = scanstring(self.s, i + 1, True)
        i = self.ws(i)
        self.expect(i, ":", "':' delimiter")
        return k, self.ws(i + 1)

    async def tick(self) -> None:
        self.items += 1
        if self.items % _CHECK_EVERY == 0 and time.perf_counter() - self.last > _SLICE_S:
            await asyncio.sleep(0)  # other requests' callbacks run here
            self.last = time.perf_counter()

    async def value(self, i: int, name: str, depth: int) -> tuple[Any, int]:
        """The value at ``text[i]`` (in top-level field ``name``): arrays and objects item by
        item, an array of numbers only (token ids) and scalars whole (C speed)."""
        c = self.s[i:i + 1]
        if c not in ("[", "{"):
            return self.leaf(i)
        if depth > _MAX_DEPTH:
            raise BodyShapeError(f"the field '{name}' is nested deeper than {_MAX_DEPTH} "
                                 "levels.", name)
        if c == "[":
            m = _NUMBERS.match(self.s, i)
            if m is not None:  # its items counted from its commas before it is parsed
                if self.s.count(",", i, m.end()) >= self.shape.max_items:
                    self._too_many(name)
                return self.leaf(i)
        close, n = ("]" if c == "[" else "}"), 0
        out: Any = [] if c == "[" else {}
        i = self.ws(i + 1)
        if self.s[i:i + 1] == close:
            return out, i + 1
        while True:
            n += 1
            if n > self.shape.max_items:
                self._too_many(name)
            if self.items > 2 * self.shape.max_items:
                raise BodyShapeError(f"the request body has more than "
                                     f"{2 * self.shape.max_items} items in all its fields: "
                                     "more than any request can use.", name)
            if c == "[":
                v, i = await self.value(i, name, depth + 1)
                out.append(v)
            else:
                k, i = self.key(i)
                out[k], i = await self.value(i, name, depth + 1)
            i = self.ws(i)
            if self.expect(i, "," + close, f"',' delimiter or '{close}'") == close:
                return out, i + 1
            i = self.ws(i + 1)
            await self.tick()

    def _too_many(self, name: str) -> None:
        raise BodyShapeError(f"the field '{name}' has an array or object of more than "
                             f"{self.shape.max_items} items: more than any request can use.",
                             name)

    async def body(self) -> Any:
        s, i = self.s, self.ws(0)
        if s[i:i + 1] != "{":  # not an object: refused whatever it holds, so not parsed
            raise BodyShapeError("the request body must be a JSON object.")
        obj: dict[str, Any] = {}
        i = self.ws(i + 1)
        if s[i:i + 1] != "}":
            while True:
                k, i = self.key(i)
                if k not in obj and len(obj) >= self.shape.max_fields:
                    raise BodyShapeError(f"the request body has more than "
                                         f"{self.shape.max_fields} fields.")
                obj[k], i = await self.value(i, k, 1)
                i = self.ws(i)
                if self.expect(i, ",}", "',' delimiter or '}'") == "}":
                    break
                i = self.ws(i + 1)
                await self.tick()
        i = self.ws(i + 1)
        if i != len(s):
            raise json.JSONDecodeError("Extra data", s, i)
        return obj


# a big body's strings are measured before parsing only where these few quote and backslash
# bytes make it cheap (a loop over them; the counts themselves run at C speed)
_MAX_SCANNED_QUOTES = 100_000


class StringScan:
    """The longest JSON string of a body, in bytes (escapes included: an upper bound of its
    characters), found chunk by chunk from the positions of its unescaped quotes without
    parsing, so a body holding a string longer than any prompt is refused while it is still
    arriving. ``longest`` counts a string still open at the end of the data fed so far.
    Gives up (``gave_up``) once the body has too many quotes or backslashes for that to be
    cheap. Not a validator: malformed JSON is the parser's to refuse."""

    def __init__(self) -> None:
        self.fed = 0  # bytes seen
        self.open_at: Optional[int] = None  # offset of the open string's quote, if any
        self.closed = 0  # the longest closed string
        self.quotes = self.backslashes = 0
        self._tail = 0  # backslashes ending the data fed so far (an escape across chunks)
        self.gave_up = False

    @property
    def longest(self) -> int:
        opened = 0 if self.open_at is None else self.fed - self.open_at - 1
        return max(self.closed, opened)

    def feed(self, chunk: bytes | bytearray) -> None:
        if self.gave_up:
            return
        # find() runs at memchr speed (count() would be several times slower over 10 MB);
        # the Python loop visits at most _MAX_SCANNED_QUOTES quotes and as many backslashes
        i = chunk.find(b'"')
        while i != -1:
            self.quotes += 1
            j = i  # an odd run of backslashes before the quote escapes it
            while j > 0 and chunk[j - 1] == 0x5C:
                j -= 1
            run = i - j + (self._tail if j == 0 else 0)
            self.backslashes += i - j
            if self.quotes > _MAX_SCANNED_QUOTES or self.backslashes > _MAX_SCANNED_QUOTES:
                self.gave_up = True
                return
            if run % 2 == 0:
                at = self.fed + i
                if self.open_at is None:
                    self.open_at = at
                else:
                    self.closed = max(self.closed, at - self.open_at - 1)
                    self.open_at = None
            i = chunk.find(b'"', i + 1)
        n = len(chunk)
        end = n  # the backslashes this chunk ends with, joined to the last chunk's if all
        while end > 0 and chunk[end - 1] == 0x5C:
            end -= 1
            if n - end > _MAX_SCANNED_QUOTES:
                self.gave_up = True
                return
        self._tail = n - end + (self._tail if end == 0 else 0)
        self.fed += n


async def loads_in_slices(data: bytes | str, shape: BodyShape) -> Any:
    """A JSON object, parsed as ``json.loads(data, parse_constant=<refuse NaN/Infinity>)``
    would parse it (strict: no control characters in strings; the last of duplicate keys
    wins), handing the event loop back every few ms; ValueError (JSONDecodeError,
    BodyShapeError) or RecursionError for what it refuses."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    return await _Parser(text, shape).body()


def shape_for(max_model_len: int, max_sequences: int, vocab_size: int) -> BodyShape:
    """The body shape of a server: a field never needs more items than the largest of a
    prompt's token ids (max_model_len), a request's prompts, and logit_bias's token ids."""
    return BodyShape(max_items=max(max_model_len, max_sequences, vocab_size, 1024))

