"""A tokenizer over a `tokenizers.Tokenizer` with the part of transformers' tokenizer interface that
servelm, its server and its benchmarks use: encode / decode / __call__, token <-> id conversion,
special tokens and their ids, `len()`, `vocab_size` and `apply_chat_template`. GGUF files and dummy
presets get one, so those paths never import transformers (a HF directory still gets transformers'
own tokenizer, which has the same interface).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from servelm.loader.chat_template import compile_chat_template, render_chat

# transformers' named special tokens, in the order of its `all_special_tokens`
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Encoding(dict):
    """`{"input_ids": [...], "attention_mask": [...]}`, also readable as attributes, like
    transformers' BatchEncoding of one text."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class LightTokenizer:
    """backend: the `tokenizers.Tokenizer` (its post-processor adds BOS/EOS when the model
    wants them); special_tokens: {"bos_token": "<s>", ...} naming tokens of the backend;
    chat_template: jinja source, or None."""

    def __init__(self, backend: Any, special_tokens: dict[str, Optional[str]],
                 chat_template: Optional[str] = None, name_or_path: str = "") -> None:
        unknown = set(special_tokens) - set(SPECIAL_TOKEN_NAMES)
        if unknown:
            raise ValueError(f"unknown special token names {sorted(unknown)}: use {SPECIAL_TOKEN_NAMES}")
        for name, token in special_tokens.items():
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        self.backend_tokenizer = backend
        self._special = {n: special_tokens.get(n) for n in SPECIAL_TOKEN_NAMES}
        self.chat_template = chat_template
        self.name_or_path = name_or_path
        self._compiled: Optional[tuple[str, Any]] = None  # (source, jinja Template), on first use

    # ---- special tokens -------------------------------------------------------------------
    @property
    def bos_token(self) -> Optional[str]:
        return self._special["bos_token"]

    @property
    def eos_token(self) -> Optional[str]:
        return self._special["eos_token"]

    @property
    def unk_token(self) -> Optional[str]:
        return self._special["unk_token"]

    @property
    def pad_token(self) -> Optional[str]:
        return self._special["pad_token"]

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._id_of(self.eos_token)

    @property
    def unk_token_id(self) -> Optional[int]:
        return self._id_of(self.unk_token)

    @property
    def pad_token_id(self) -> Optional[int]:
        return self._id_of(self.pad_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {n: t for n, t in self._special.items() if t is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self.special_tokens_map.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.backend_tokenizer.token_to_id(t) for t in self.all_special_tokens]

    # ---- vocabulary -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens (transformers' `vocab_size`)."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]) -> Union[int, None, list]:
        """Unknown tokens map to the unknown token's id (None without one), as in transformers."""
        if isinstance(tokens, str):
            return self._id_or_unk(tokens)
        return [self._id_or_unk(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Union[int, Sequence[int]],
                              skip_special_tokens: bool = False) -> Union[str, None, list]:
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend_tokenizer.id_to_token(i) for i in ids if i not in special]

    # ---- text <-> ids ---------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: Union[str, Sequence[str]], add_special_tokens: bool = True) -> Encoding:
        if isinstance(text, str):
            ids: Any = self.encode(text, add_special_tokens)
            mask: Any = [1] * len(ids)
        else:
            ids = [self.encode(t, add_special_tokens) for t in text]
            mask = [[1] * len(i) for i in ids]
        return Encoding(input_ids=ids, attention_mask=mask)

    def decode(self, ids: Union[int, Sequence[int]], skip_special_tokens: bool = False) -> str:
        """Skipping drops every token added as special (GGUF control tokens too), as transformers."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # ---- chat -----------------------------------------------------------------------------
    def apply_chat_template(self, conversation: Sequence[Any], tools: Optional[list] = None,
                            documents: Optional[list] = None, chat_template: Optional[str] = None,
                            add_generation_prompt: bool = False,
                            continue_final_message: Union[bool, str] = False,
                            tokenize: bool = True, return_dict: bool = False,
                            **kwargs: Any) -> Any:
        """The conversation (a list of {"role", "content", ...}; or a list of those) as prompt
        text (tokenize=False) or token ids (no special tokens added: the template holds them).
        kwargs are template variables; they override the special tokens of the same name."""
        source = chat_template or self.chat_template
        if source is None:
            raise ValueError("this tokenizer has no chat template: pass chat_template=... or use "
                             "plain prompts")
        if not conversation:
            raise ValueError("cannot apply a chat template to an empty conversation")
        batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        chats = conversation if batched else [conversation]
        template = self._template(source)
        context = {**self.special_tokens_map, **kwargs}
        texts = [render_chat(template, source, getattr(c, "messages", c),
                             add_generation_prompt=add_generation_prompt,
                             continue_final_message=continue_final_message, tools=tools,
                             documents=documents, **context) for c in chats]
        if not tokenize:
            return texts if batched else texts[0]
        ids = [self.encode(t, add_special_tokens=False) for t in texts]
        if return_dict:
            enc = Encoding(input_ids=ids, attention_mask=[[1] * len(i) for i in ids])
            return enc if batched else Encoding(input_ids=ids[0], attention_mask=enc.attention_mask[0])
        return ids if batched else ids[0]

    # ---- internals ------------------------------------------------------------------------
    def _template(self, source: str) -> Any:
        if self._compiled is None or self._compiled[0] != source:
            self._compiled = (source, compile_chat_template(source))
        return self._compiled[1]

    def _id_of(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    def _id_or_unk(self, token: str) -> Optional[int]:
        i = self.backend_tokenizer.token_to_id(token)
        return i if i is not None else self.unk_token_id

    def __repr__(self) -> str:
        return (f"LightTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"added={len(self) - self.vocab_size}, special={self.special_tokens_map})")
