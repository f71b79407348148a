"""A synthetic tokenizer for dummy presets: one word per token id ("w0" .. "w{V-1}", split on
whitespace, joined by spaces), so a server on random weights takes and returns text and the
online benchmark runs with no tokenizer files at hand. Text made of its words round-trips."""
from __future__ import annotations

from typing import Optional

from servelm.loader.light_tokenizer import LightTokenizer

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w1 {% endif %}")


def synthetic_tokenizer(vocab_size: int, eos_token_id: Optional[int] = None,
                        bos_token_id: Optional[int] = None) -> LightTokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    def word(i: int) -> AddedToken:
        # whole words only: as a plain added token "w1" would also match inside "w17"
        return AddedToken(f"w{i}", single_word=True, normalized=False, special=True)

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by spaces
    special = {"unk_token": 0}
    if eos_token_id is not None and 0 <= eos_token_id < vocab_size:
        special["eos_token"] = eos_token_id
    if bos_token_id is not None and 0 <= bos_token_id < vocab_size:
        special["bos_token"] = bos_token_id
    # the special words are added tokens (skipped by decode(skip_special_tokens=True)), as
    # transformers' PreTrainedTokenizerFast adds its named special tokens
    tok.add_special_tokens([word(i) for i in dict.fromkeys(special.values())])
    return LightTokenizer(tok, {name: f"w{i}" for name, i in special.items()}, CHAT_TEMPLATE,
                          name_or_path="synthetic")


def preset_tokenizer(name: str) -> LightTokenizer:
    """The synthetic tokenizer of dummy preset ``name`` (its vocabulary size and EOS)."""
    from servelm.loader.presets import preset_config

    cfg = preset_config(name)
    eos = getattr(cfg, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return synthetic_tokenizer(cfg.vocab_size, eos, getattr(cfg, "bos_token_id", None))
