"""IncrementalDetokenizer with real (tiny, trained in memory) tokenizers, and find_stop."""
from __future__ import annotations

import json
import random

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from servelm.engine.detokenizer import IncrementalDetokenizer, find_stop  # noqa: E402

CORPUS = [
    "héllo wörld, ça va? naïve café crème brûlée",
    "日本語のテキストです。東京は大きい都市です。",
    "emoji 🙂🙃 and 👍🏽 family 👨‍👩‍👧 flags 🇯🇵",
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.!",
    "Ελληνικά και русский текст, עברית, العربية",
    "  spaces\tand\nnewlines  \n\n code: def f(x): return x**2",
]
TEXTS = [
    "héllo 日本語 🙂",
    "naïve 👨‍👩‍👧 café — ok",
    "東京は大きい 🙃🙂👍🏽 end.",
    "Ελληνικά и русский 🇯🇵 ça",
    "plain ascii text, nothing fancy at all",
    "unseen: 5€ — 😀 ✓ ü",  # characters the tokenizers never saw: byte pieces only
]


def _byte_level():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                clean_up_tokenization_spaces=False)


def _metaspace():
    """SentencePiece-like (Llama 2 style): '▁' for spaces, byte fallback, leading space stripped
    on decode, so decoding is not a plain concatenation of tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    # byte-fallback pieces are ordinary vocabulary entries (as in Llama's tokenizer), not specials
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                                                bos_token="<s>", unk_token="<unk>",
                                                clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def byte_tok():
    return _byte_level()


@pytest.fixture(scope="module")
def sp_tok():
    return _metaspace()


def _stream(tok, prompt_ids, out_ids, rng, skip=True, max_chunk=1):
    d = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    deltas, i = [], 0
    while i < len(out_ids):
        n = rng.randint(1, max_chunk)
        deltas.append(d.step(out_ids[i:i + n]))
        i += n
    return deltas


# ---- byte-level BPE ----------------------------------------------------------------------------
@pytest.mark.parametrize("max_chunk", [1, 3])
def test_valid_text_streams_exactly_without_replacement_chars(byte_tok, max_chunk):
    rng = random.Random(max_chunk)
    prompt_ids = byte_tok.encode("Prompt: 日本 ")
    for text in TEXTS:
        ids = byte_tok.encode(text)
        # the tokenizer really splits characters across tokens
        assert any("\ufffd" in byte_tok.decode([i]) for i in ids) or text.isascii()
        deltas = _stream(byte_tok, prompt_ids, ids, rng, max_chunk=max_chunk)
        assert "".join(deltas) == text == byte_tok.decode(ids)
        assert not any("\ufffd" in x for x in deltas)


def test_long_stream_crosses_the_window_trim(byte_tok):
    rng = random.Random(1)
    text = " ".join(rng.choice(TEXTS) for _ in range(30))
    ids = byte_tok.encode(text)
    assert len(ids) > 200
    deltas = _stream(byte_tok, byte_tok.encode("hi"), ids, rng, max_chunk=4)
    assert "".join(deltas) == text
    assert not any("\ufffd" in x for x in deltas)


def test_empty_prompt(byte_tok):
    ids = byte_tok.encode(TEXTS[0])
    deltas = _stream(byte_tok, [], ids, random.Random(0))
    assert "".join(deltas) == TEXTS[0]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_concatenate_to_decode(byte_tok, seed, skip):
    """Random ids (often invalid UTF-8, special tokens mixed in): the deltas are always a prefix
    of the full decode; only a trailing incomplete character may be held back."""
    rng = random.Random(seed)
    V = len(byte_tok)
    out = [rng.randrange(V) for _ in range(rng.randrange(1, 120))]
    prompt_ids = byte_tok.encode(rng.choice(TEXTS))
    deltas = _stream(byte_tok, prompt_ids, out, rng, skip=skip, max_chunk=rng.choice([1, 2, 5]))
    full = byte_tok.decode(out, skip_special_tokens=skip)
    got = "".join(deltas)
    assert full.startswith(got)
    if not full.endswith("\ufffd"):
        assert got == full
    else:
        assert full[len(got):].endswith("\ufffd")


def test_special_tokens_skipped_or_kept(byte_tok):
    eos = byte_tok.eos_token_id
    ids = byte_tok.encode("héllo") + [eos] + byte_tok.encode(" 日本")
    assert "".join(_stream(byte_tok, [], ids, random.Random(0), skip=True)) == "héllo 日本"
    assert "".join(_stream(byte_tok, [], ids, random.Random(0), skip=False)) == \
        "héllo<|endoftext|> 日本"


def test_special_token_between_bytes_of_one_character(byte_tok):
    """'日' is split over tokens; an EOS between them (skipped) must not produce U+FFFD."""
    ch = "日"
    pieces = [byte_tok.convert_tokens_to_ids(t) for t in _split_bytes(byte_tok, ch)]
    if len(pieces) < 2:
        pytest.skip("the tokenizer has '日' as a single token")
    ids = pieces[:1] + [byte_tok.eos_token_id] + pieces[1:]
    deltas = _stream(byte_tok, [], ids, random.Random(0), skip=True)
    assert "".join(deltas) == ch == byte_tok.decode(ids, skip_special_tokens=True)


def _split_bytes(tok, ch):
    from tokenizers import pre_tokenizers
    # the byte-level alphabet symbols of ch's UTF-8 bytes, each a token of the base vocabulary
    return [s for s, _ in pre_tokenizers.ByteLevel(add_prefix_space=False)
            .pre_tokenize_str(ch)][0]


# ---- SentencePiece-like ------------------------------------------------------------------------
@pytest.mark.parametrize("max_chunk", [1, 2])
def test_metaspace_tokenizer_keeps_leading_spaces(sp_tok, max_chunk):
    rng = random.Random(10 + max_chunk)
    for prompt in ["Hello there", "日本語の", "x"]:
        p_ids = sp_tok.encode(prompt, add_special_tokens=False)
        for text in TEXTS:
            out = sp_tok.encode(text, add_special_tokens=False)  # starts with a '▁' word
            deltas = _stream(sp_tok, p_ids, out, rng, max_chunk=max_chunk)
            full = sp_tok.decode(p_ids + out)
            want = full[len(sp_tok.decode(p_ids)):]
            assert want.startswith(" ")  # the space a fresh decode of `out` alone would strip
            assert "".join(deltas) == want, (prompt, text)
            assert not any("\ufffd" in x for x in deltas)


# ---- find_stop ---------------------------------------------------------------------------------
def test_find_stop_basic_include_exclude():
    text = "Hello world. STOP here"
    assert find_stop(text, len(text), ["STOP"], include=False) == ("STOP", 13)
    assert find_stop(text, len(text), ["STOP"], include=True) == ("STOP", 17)
    assert find_stop(text, len(text), ["nope"], include=False) is None
    assert find_stop(text, len(text), [], include=True) is None


def test_find_stop_spanning_deltas():
    text = "abcST"
    assert find_stop(text, 2, ["STOP"], include=False) is None
    text += "OPxyz"
    assert find_stop(text, 5, ["STOP"], include=False) == ("STOP", 3)
    assert find_stop(text, 5, ["STOP"], include=True) == ("STOP", 7)
    # only the tail the new text touches is searched: an old, complete match is not re-found
    assert find_stop("STOPabc", 3, ["STOP"], include=False) is None


def test_find_stop_earliest_wins():
    text = "one two three"
    assert find_stop(text, len(text), ["three", "two"], include=False) == ("two", 4)
    assert find_stop(text, len(text), ["three", "two"], include=True) == ("two", 7)
    # same start: the first listed wins
    assert find_stop(text, len(text), ["tw", "two"], include=True) == ("tw", 6)


@pytest.mark.parametrize("seed", range(30))
def test_find_stop_streaming_matches_reference(seed):
    """Feed random text in random deltas, checking after each as the output processor does; the
    first hit must be the earliest-starting stop among those completed in that delta."""
    rng = random.Random(seed)
    alphabet = "ab日🙂 "
    text = "".join(rng.choice(alphabet) for _ in range(80))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
             for _ in range(rng.randint(1, 3))]
    include = rng.random() < 0.5
    so_far, hit = "", None
    pos = 0
    while pos < len(text) and hit is None:
        n = rng.randint(1, 6)
        delta = text[pos:pos + n]
        pos += n
        prev_len = len(so_far)
        so_far += delta
        hit = find_stop(so_far, len(delta), stops, include)
        # reference: occurrences completed by this delta (none completed earlier)
        occ = [(i, k, s) for k, s in enumerate(stops) for i in range(len(so_far))
               if so_far.startswith(s, i) and i + len(s) <= len(so_far)]
        assert all(i + len(s) > prev_len for i, k, s in occ)
        if not occ:
            assert hit is None
        else:
            i, k, s = min(occ)
            assert hit == (s, i + len(s) if include else i)


@pytest.mark.parametrize("group", [2, 3, 5])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_inside_a_step_of_several_tokens(byte_tok, group, include):
    """The output processor fed a sequence's tokens several per step (speculative or multi-step
    outputs) ends where it ends fed one per step: the text cut at the stop string, the tokens
    and their logprobs after the one completing it dropped, the core told to stop it."""
    from servelm import SamplingParams
    from servelm.core.step import EngineCoreOutput
    from servelm.engine.output_processor import OutputProcessor
    prompt = byte_tok.encode("Prompt:")
    ids = byte_tok.encode(" the quick brown fox jumps over the lazy dog and runs away")
    lps = [{t: (-0.5 - 0.01 * j, 1)} for j, t in enumerate(ids)]
    sp = SamplingParams(max_tokens=100, stop=["lazy"], include_stop_str_in_output=include,
                        logprobs=0)

    def run(n):
        op = OutputProcessor(byte_tok)
        op.add_request("r", None, prompt, sp, 0.0)
        stopped, out = [], None
        for i in range(0, len(ids), n):
            res, st = op.process([EngineCoreOutput("r", ids[i:i + n], new_logprobs=lps[i:i + n])])
            stopped += st
            if res:
                out = res[0].outputs[0]
            if out is not None and out.finish_reason:
                break
        return out, stopped
    want, stop1 = run(1)
    got, stopn = run(group)
    assert want.finish_reason == "stop" and want.text.endswith("lazy" if include else "the ")
    assert (got.text, got.finish_reason, got.stop_reason) == \
        (want.text, want.finish_reason, want.stop_reason)
    assert got.token_ids == want.token_ids and len(got.logprobs) == len(want.token_ids)
    assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob)
    assert stop1 == stopn == ["r"]
