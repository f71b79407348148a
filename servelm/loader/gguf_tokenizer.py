"""The tokenizer of a GGUF file, built from its `tokenizer.ggml.*` metadata with the `tokenizers`
library alone, token-identical to `AutoTokenizer.from_pretrained(dir, gguf_file=...)` of
transformers 5 (tests/unit/test_gguf_tokenizer.py compares them on the embedded SmolLM2).

Byte-level BPE (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Llama 3, Qwen2/3) is built here as
transformers builds it: the vocabulary respelled in GPT-2's byte alphabet, the file's merges,
a ByteLevel pre-tokenizer (or, for the `tokenizer.ggml.pre` types transformers knows, the split
regex the merges were learned with), a ByteLevel decoder; control tokens (type 3) added as special,
user-defined ones (type 4) as plain added tokens; BOS/EOS added when the file says so. Other
tokenizer models (sentencepiece "llama": Llama 2, Mistral, TinyLlama) are built by transformers,
imported for that file only.
"""
from __future__ import annotations

import os
from types import MappingProxyType
from typing import Any, Optional

from servelm.loader.gguf_file import GGUFFile
from servelm.loader.light_tokenizer import LightTokenizer

_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values

# Split regexes by `tokenizer.ggml.pre`, as transformers 5 maps them (gguf_tokenizer_mapping.py);
# other types keep GPT-2's ByteLevel regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = MappingProxyType({
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
})
# named special token -> its GGUF id key
_SPECIAL_IDS = MappingProxyType({"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                                 "unk_token": "unknown_token_id", "pad_token": "padding_token_id"})


def load_gguf_tokenizer(path: str, reader: Optional[GGUFFile] = None) -> Any:
    """The tokenizer described by the GGUF file at `path`: a LightTokenizer for byte-level BPE,
    else transformers' (sentencepiece vocabularies). ValueError if the file has none."""
    reader = reader or GGUFFile(path)
    model = reader.field("tokenizer.ggml.model")
    if model is None or reader.field("tokenizer.ggml.tokens") is None:
        raise ValueError(f"{path!r} has no tokenizer (no tokenizer.ggml.model / tokens metadata): "
                         "pass tokenizer=<a HF directory or .gguf file that has one>")
    if model == "gpt2":
        return byte_level_tokenizer(reader, path)
    from transformers import AutoTokenizer  # only for vocabularies not built here

    return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                         gguf_file=os.path.basename(path))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (bytes that are printable map to
    themselves, the rest to code points from 256 up)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def byte_level_tokenizer(reader: GGUFFile, path: str = "") -> LightTokenizer:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens: list[str] = reader.field("tokenizer.ggml.tokens")
    types: list[int] = reader.field("tokenizer.ggml.token_type") or []
    merges = reader.field("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError(f"{path!r}: a byte-level BPE tokenizer without tokenizer.ggml.merges is "
                         "not supported")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # tokens written in plain UTF-8 (e.g. by some converters) are respelled in the byte alphabet
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                                   dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(reader.field("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # control tokens written outside the byte alphabet are llama.cpp mislabels: skipped, as
    # transformers does (adding them would grow the vocabulary past the model's)
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
    if control:
        backend.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in backend.get_vocab()]
    if user:
        backend.add_tokens(user)
    special = {name: _token(reader, tokens, key) for name, key in _SPECIAL_IDS.items()}
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [AddedToken(t, special=True) for t in dict.fromkeys(special.values())
               if t is not None and t not in added]
    if missing:
        backend.add_special_tokens(missing)
    add_bos = bool(reader.field("tokenizer.ggml.add_bos_token", False)) and special["bos_token"] is not None
    add_eos = bool(reader.field("tokenizer.ggml.add_eos_token", False)) and special["eos_token"] is not None
    backend.post_processor = _template_processing(processors, backend, special, add_bos, add_eos)
    return LightTokenizer(backend, special, reader.field("tokenizer.chat_template"), path)


def _token(reader: GGUFFile, tokens: list[str], key: str) -> Optional[str]:
    token_id = reader.field(f"tokenizer.ggml.{key}")
    return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None


def _template_processing(processors: Any, backend: Any, special: dict, add_bos: bool,
                         add_eos: bool) -> Any:
    """"[BOS] $A [EOS]" (pairs: "[BOS] $A [EOS] [BOS] $B [EOS]"), as transformers'
    update_post_processor writes it."""
    bos, eos = special["bos_token"], special["eos_token"]
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    tokens = ([(bos, backend.token_to_id(bos))] if add_bos else []) + \
        ([(eos, backend.token_to_id(eos))] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)
