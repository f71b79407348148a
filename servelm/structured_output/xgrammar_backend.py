"""xgrammar as the grammar backend: JSON schemas, JSON, regexes, choices and EBNF grammars compiled
into a pushdown automaton with a per-state cache of allowed tokens (fast bitmask fills: a few
microseconds per sequence per step)."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import xgrammar as xgr

from servelm.structured_output.backend import BatchOps, CompiledGrammar, GrammarBackend
from servelm.structured_output.params import StructuredOutputsParams
from servelm.structured_output.schema_check import check_json_schema, check_regex

_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> Any:
    """xgrammar's view of the vocabulary: each id's token string and how strings map to bytes.
    Works for transformers' fast tokenizers and servelm's LightTokenizer (GGUF, dummy), which
    xgrammar's own ``from_huggingface`` does not take. Ids past the tokenizer's vocabulary (a
    padded lm_head) stay empty strings: never allowed."""
    encoded = [""] * vocab_size
    vocab = tokenizer.get_vocab()
    for tok, i in vocab.items():
        if 0 <= i < vocab_size:
            encoded[i] = tok
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = ""
    if backend is not None:
        decoder = json.dumps(json.loads(backend.to_str()).get("decoder"))
    if "<0x0A>" in vocab:  # SentencePiece with byte fallback (Llama 2, Mistral)
        vocab_type = xgr.VocabType.BYTE_FALLBACK
    elif "ByteLevel" in decoder:  # GPT-2 style bytes-as-characters (Llama 3, Qwen, SmolLM)
        vocab_type = xgr.VocabType.BYTE_LEVEL
    else:
        vocab_type = xgr.VocabType.RAW
    add_prefix_space = False
    if vocab_type == xgr.VocabType.BYTE_FALLBACK:
        first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
        add_prefix_space = bool(first) and first[0].startswith("\u2581")
    stops = [int(t) for t in stop_token_ids if 0 <= int(t) < vocab_size]
    if not stops and getattr(tokenizer, "eos_token_id", None) is not None:
        stops = [int(tokenizer.eos_token_id)]
    return xgr.TokenizerInfo(encoded, vocab_type, vocab_size=vocab_size,
                             stop_token_ids=stops or None, add_prefix_space=add_prefix_space)


def _ebnf_literal(s: str) -> str:
    # JSON string escapes (\" \\ \n \t \uXXXX) are xgrammar EBNF's string escapes
    return json.dumps(s, ensure_ascii=False)


def choice_grammar(choices: Sequence[str]) -> str:
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)


class XgrammarBatchOps(BatchOps):
    """xgrammar's batch calls: one C++ call for all rows; fills spread over threads (4 at
    most: measured on the H100 host, 256 rows, 1/4/8/16 threads took 12.7/5.4/6.1/6.6 ms)."""

    def __init__(self) -> None:
        threads = max(1, min(4, (os.cpu_count() or 2) // 2))
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def fill(self, matchers: Sequence[Any], bitmask: Any, rows: Sequence[int]) -> None:
        self.batch.batch_fill_next_token_bitmask(list(matchers), bitmask, list(rows))

    def accept(self, matchers: Sequence[Any], tokens: Sequence[int]) -> None:
        xgr.BatchGrammarMatcher.batch_accept_token(list(matchers), list(tokens))


class XgrammarCompiled(CompiledGrammar):
    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled

    def matcher(self, max_rollback_tokens: int) -> Any:
        return xgr.GrammarMatcher(self.compiled, max_rollback_tokens=max_rollback_tokens)

    def batch_ops(self) -> BatchOps:
        return XgrammarBatchOps()


class XgrammarBackend(GrammarBackend):
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int],
                 max_threads: int = 4, info: Any = None) -> None:
        self.info = info or tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        # xgrammar caches compiled grammars by their source and options; bounded in bytes
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads,
                                            cache_enabled=True, cache_limit_bytes=512 << 20)

    def state(self) -> str:
        return self.info.serialize_json()  # about 1.6 MB for a 49k vocabulary

    @classmethod
    def from_state(cls, state: str) -> "XgrammarBackend":
        return cls(None, 0, (), info=xgr.TokenizerInfo.deserialize_json(state))

    @staticmethod
    def validate(params: StructuredOutputsParams) -> None:
        """Parses the constraint (no vocabulary needed; a fraction of a millisecond)."""
        kind = params.kind
        try:
            if kind == "json":
                try:
                    schema = json.loads(params.json)
                except json.JSONDecodeError as e:
                    raise ValueError(f"the JSON schema is not valid JSON: {e}.") from None
                check_json_schema(schema)
                xgr.Grammar.from_json_schema(params.json, **_json_options(params))
            elif kind == "regex":
                check_regex(params.regex)
                xgr.Grammar.from_regex(params.regex)
            elif kind == "grammar":
                xgr.Grammar.from_ebnf(params.grammar)
            elif kind == "choice":
                xgr.Grammar.from_ebnf(choice_grammar(params.choice))
        except ValueError:
            raise
        except Exception as e:  # xgrammar reports syntax errors as RuntimeError
            raise ValueError(f"invalid structured-output {kind}: {_message(e)}") from None

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        c, kind = self.compiler, params.kind
        try:
            if kind == "json":
                g = c.compile_json_schema(params.json, **_json_options(params))
            elif kind == "json_object":
                g = c.compile_builtin_json_grammar()
            elif kind == "regex":
                g = c.compile_regex(params.regex)
            elif kind == "choice":
                g = c.compile_grammar(choice_grammar(params.choice))
            else:
                g = c.compile_grammar(params.grammar)
        except Exception as e:
            raise ValueError(f"invalid structured-output {kind}: {_message(e)}") from None
        return XgrammarCompiled(g)


def _json_options(params: StructuredOutputsParams) -> dict[str, Any]:
    # strict_mode: objects take only the listed properties unless the schema allows more
    # (additionalProperties), as OpenAI's strict json_schema and vLLM with xgrammar
    opts: dict[str, Any] = {"strict_mode": True}
    if params.disable_any_whitespace:
        opts.update(any_whitespace=False, separators=(",", ":"))
    return opts


def _message(e: Exception) -> str:
    # "[03:01:02] /project/cpp/regex_converter.cc:83: Regex parsing error ..." -> the message
    s = _LOG_PREFIX.sub("", str(e).strip())
    return s.splitlines()[0] if s else type(e).__name__
