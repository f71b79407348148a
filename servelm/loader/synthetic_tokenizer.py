"""A synthetic tokenizer for dummy presets: one word per token id ("w0" .. "w{V-1}", split on
whitespace, joined by spaces), so a server on random weights takes and returns text and the
online benchmark runs with no tokenizer files at hand. Text made of its words round-trips."""
from __future__ import annotations

from typing import Any, Optional

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w1 {% endif %}")


def synthetic_tokenizer(vocab_size: int, eos_token_id: Optional[int] = None,
                        bos_token_id: Optional[int] = None) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def word(i: int) -> AddedToken:
        # whole words only: as a plain added token "w1" would also match inside "w17"
        return AddedToken(f"w{i}", single_word=True, normalized=False, special=True)

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by spaces
    special = {}
    if eos_token_id is not None and 0 <= eos_token_id < vocab_size:
        special["eos_token"] = word(eos_token_id)
    if bos_token_id is not None and 0 <= bos_token_id < vocab_size:
        special["bos_token"] = word(bos_token_id)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=word(0), **special)
    out.chat_template = CHAT_TEMPLATE
    return out


def preset_tokenizer(name: str) -> Any:
    """The synthetic tokenizer of dummy preset ``name`` (its vocabulary size and EOS)."""
    from servelm.loader.presets import preset_config

    cfg = preset_config(name)
    eos = getattr(cfg, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return synthetic_tokenizer(cfg.vocab_size, eos, getattr(cfg, "bos_token_id", None))
