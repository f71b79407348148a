"""The grammar-backend seam: a backend checks a request's constraint, compiles it for the model's
vocabulary, and hands out matchers that track one sequence.

A compiled grammar is what a request carries from the engine core (which compiles off the step
loop) to the runner's grammar logits processor; a matcher follows one sequence's tokens and fills
its row of a token bitmask: int32 words, bit j of word w allows token 32 * w + j (xgrammar's
layout, which the processor applies on the device).

Matcher protocol (xgrammar's method names): ``accept_token(id) -> bool``,
``fill_next_token_bitmask(bitmask [R, W] int32 on the host, row)``, ``rollback(n)``,
``is_terminated() -> bool``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from types import MappingProxyType
from typing import Any, Sequence

from servelm.registry import check_name, load_class
from servelm.structured_output.params import StructuredOutputsParams


class BatchOps:
    """Many matchers at once (a step's rows); here one at a time, a backend may do better."""

    def fill(self, matchers: Sequence[Any], bitmask: Any, rows: Sequence[int]) -> None:
        for m, r in zip(matchers, rows):
            m.fill_next_token_bitmask(bitmask, r)

    def accept(self, matchers: Sequence[Any], tokens: Sequence[int]) -> None:
        for m, t in zip(matchers, tokens):
            m.accept_token(t)


class CompiledGrammar(ABC):
    @abstractmethod
    def matcher(self, max_rollback_tokens: int) -> Any:
        """A fresh matcher at the grammar's start; it can roll back that many tokens."""

    def batch_ops(self) -> BatchOps:
        """Batched fill/accept for this backend's matchers (the processor keeps one)."""
        return BatchOps()


class GrammarBackend(ABC):
    """Built as ``cls(tokenizer, vocab_size, stop_token_ids)`` (the model's vocabulary size:
    ids past the tokenizer's are never allowed; stop ids end a finished grammar)."""

    @staticmethod
    @abstractmethod
    def validate(params: StructuredOutputsParams) -> None:
        """Cheap checks with no tokenizer (syntax, unsupported features): ValueError saying
        what is wrong. Runs where the request arrives, so bad input is a 400 at once."""

    @abstractmethod
    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """The grammar for this vocabulary (may take long: called on a worker thread)."""

    @abstractmethod
    def state(self) -> Any:
        """What ``from_state`` needs to build this backend in another process (picklable; the
        vocabulary tables, not the tokenizer)."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: Any) -> "GrammarBackend":
        """This backend again, in the grammar mask process (service.py)."""


GRAMMAR_BACKENDS = MappingProxyType({
    "xgrammar": "servelm.structured_output.xgrammar_backend:XgrammarBackend",
})


def backend_class(name: str) -> type[GrammarBackend]:
    name = "xgrammar" if name == "auto" else name
    check_name(GRAMMAR_BACKENDS, name, "structured outputs backend")
    try:
        return load_class(GRAMMAR_BACKENDS, name, "structured outputs backend")
    except ImportError as e:
        raise ValueError(f"structured outputs need the {name} package (missing: {e.name}); "
                         f"install it with `pip install {name}` or `pip install "
                         "'servelm[structured]'`.") from None
