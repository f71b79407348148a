"""Benchmark request sets: `random`, `sharegpt-like` and `jsonl`, each seeded and reproducible.

A tokenizer is optional everywhere. With one, synthetic prompts are decoded to text and their
length re-measured with `encode`; without one, prompts stay token-id lists, which OpenAI's
/v1/completions accepts as `prompt`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Union

import numpy as np

DATASET_NAMES = ("random", "sharegpt-like", "jsonl")

# sharegpt-like: lengths are round(lognormal(mu, sigma)) clipped to [4, 1024], the filter vLLM
# applies to ShareGPT (drop prompts or outputs under 4 tokens or prompts over 1024). sigma sets
# the long tail (median well under the mean, about 2% of prompts at the 1024 cap, as in
# ShareGPT); mu was then solved numerically so the *clipped* mean hits the target:
#   input:  sigma 1.0, mu 4.929 -> mean ~215, median ~138 tokens
#   output: sigma 0.9, mu 4.921 -> mean ~200, median ~137 tokens
SHAREGPT_INPUT_MU, SHAREGPT_INPUT_SIGMA = 4.929, 1.0
SHAREGPT_OUTPUT_MU, SHAREGPT_OUTPUT_SIGMA = 4.921, 0.9
SHAREGPT_MIN_LEN, SHAREGPT_MAX_LEN = 4, 1024


class Tokenizer(Protocol):
    """What the benchmark needs of a tokenizer (a Hugging Face tokenizer fits)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: a text or token-id prompt and how many tokens to ask for."""

    prompt: Union[str, list[int]]
    prompt_len: int
    output_len: int


def build_requests(name: str, *, num_prompts: int, seed: int,
                   tokenizer: Optional[Tokenizer] = None, random_input_len: int = 1024,
                   random_output_len: int = 128, random_range_ratio: float = 0.0,
                   random_vocab_size: int = 32000, max_model_len: Optional[int] = None,
                   dataset_path: Optional[str] = None) -> list[BenchRequest]:
    """Build `num_prompts` requests of the named dataset (one of DATASET_NAMES)."""
    if name == "random":
        return random_requests(num_prompts, random_input_len, random_output_len,
                               random_range_ratio, seed, tokenizer, random_vocab_size)
    if name == "sharegpt-like":
        return sharegpt_like_requests(num_prompts, seed, tokenizer, max_model_len,
                                      random_vocab_size)
    if name == "jsonl":
        if not dataset_path:
            raise ValueError("--dataset-name jsonl needs --dataset-path PATH.jsonl.")
        return jsonl_requests(dataset_path, num_prompts, tokenizer)
    raise ValueError(f"--dataset-name must be one of {', '.join(DATASET_NAMES)}; got {name!r}.")


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
    tokenizer: Optional[Tokenizer] = None,
    vocab_size: int = 32000,
) -> list[BenchRequest]:
    """Prompts of random token ids; lengths uniform in [len*(1-r), len*(1+r)] (vLLM's ratio)."""
    _check_positive("num_prompts", num_prompts)
    _check_positive("random_input_len", input_len)
    _check_positive("random_output_len", output_len)
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}.")
    rng = np.random.default_rng(seed)
    in_lens = _uniform_lens(rng, num_prompts, input_len, range_ratio)
    out_lens = _uniform_lens(rng, num_prompts, output_len, range_ratio)
    token_pool = _token_pool(tokenizer, vocab_size)
    return [_synthetic_request(rng, token_pool, int(i), int(o), tokenizer)
            for i, o in zip(in_lens, out_lens)]


def sharegpt_like_requests(
    num_prompts: int,
    seed: int = 0,
    tokenizer: Optional[Tokenizer] = None,
    max_model_len: Optional[int] = None,
    vocab_size: int = 32000,
) -> list[BenchRequest]:
    """Random-token prompts whose input/output lengths follow ShareGPT's long-tailed shape.

    Lengths are lognormal (parameters at the top of this module), clipped to [4, 1024]; with
    `max_model_len`, inputs are also capped at max_model_len - 4 and outputs at
    max_model_len - input, so every request fits the context.
    """
    _check_positive("num_prompts", num_prompts)
    max_in, min_len = SHAREGPT_MAX_LEN, SHAREGPT_MIN_LEN
    if max_model_len is not None:
        if max_model_len < 2 * min_len:
            raise ValueError(f"--max-model-len must be >= {2 * min_len}, got {max_model_len}.")
        max_in = min(max_in, max_model_len - min_len)
    rng = np.random.default_rng(seed)
    in_lens = _lognormal_lens(rng, num_prompts, SHAREGPT_INPUT_MU, SHAREGPT_INPUT_SIGMA, max_in)
    out_lens = _lognormal_lens(
        rng, num_prompts, SHAREGPT_OUTPUT_MU, SHAREGPT_OUTPUT_SIGMA, SHAREGPT_MAX_LEN)
    if max_model_len is not None:
        out_lens = np.minimum(out_lens, max_model_len - in_lens)
    token_pool = _token_pool(tokenizer, vocab_size)
    return [_synthetic_request(rng, token_pool, int(i), int(o), tokenizer)
            for i, o in zip(in_lens, out_lens)]


def jsonl_requests(
    path: Union[str, Path],
    num_prompts: Optional[int] = None,
    tokenizer: Optional[Tokenizer] = None,
) -> list[BenchRequest]:
    """Read `{"prompt": str | [ids], "output_len": int, "prompt_len"?: int}` lines.

    With `num_prompts`, the first that many lines are used, cycling if the file is shorter.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--dataset-path {str(path)!r} is not a file; pass a .jsonl file.")
    requests = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                requests.append(_parse_jsonl_line(line, lineno, path, tokenizer))
    if not requests:
        raise ValueError(f"--dataset-path {str(path)!r} has no requests.")
    if num_prompts is None:
        return requests
    _check_positive("num_prompts", num_prompts)
    return [requests[i % len(requests)] for i in range(num_prompts)]


def _parse_jsonl_line(line: str, lineno: int, path: Path,
                      tokenizer: Optional[Tokenizer]) -> BenchRequest:
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e}).") from None
    if not isinstance(row, dict) or "prompt" not in row or "output_len" not in row:
        raise ValueError(f'{where}: each line must be an object with "prompt" and "output_len".')
    prompt, output_len = row["prompt"], row["output_len"]
    is_ids = isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
    if not (isinstance(prompt, str) or is_ids) or not prompt:
        raise ValueError(f'{where}: "prompt" must be a non-empty string or list of token ids.')
    if not isinstance(output_len, int) or output_len < 1:
        raise ValueError(f'{where}: "output_len" must be an integer >= 1, got {output_len!r}.')
    if "prompt_len" in row:
        prompt_len = row["prompt_len"]
        if not isinstance(prompt_len, int) or prompt_len < 1:
            raise ValueError(f'{where}: "prompt_len" must be an integer >= 1.')
    elif is_ids:
        prompt_len = len(prompt)
    elif tokenizer is not None:
        prompt_len = len(tokenizer.encode(prompt))
    else:
        raise ValueError(f'{where}: text prompt without "prompt_len"; add "prompt_len" to '
                         f"each line or pass --tokenizer so it can be measured.")
    return BenchRequest(prompt=prompt, prompt_len=prompt_len, output_len=output_len)


def _synthetic_request(rng: np.random.Generator, token_pool: np.ndarray, input_len: int,
                       output_len: int, tokenizer: Optional[Tokenizer]) -> BenchRequest:
    ids = [int(t) for t in rng.choice(token_pool, size=input_len)]
    if tokenizer is None:
        return BenchRequest(prompt=ids, prompt_len=input_len, output_len=output_len)
    # decode -> encode rarely round-trips exactly (merges across ids); report what is sent.
    text = tokenizer.decode(ids)
    return BenchRequest(prompt=text, prompt_len=len(tokenizer.encode(text)),
                        output_len=output_len)


def _token_pool(tokenizer: Optional[Tokenizer], vocab_size: int) -> np.ndarray:
    """Ids to draw prompts from: the tokenizer's vocabulary minus its special tokens."""
    if tokenizer is not None:
        vocab_size = _tokenizer_vocab_size(tokenizer) or vocab_size
    _check_positive("random_vocab_size", vocab_size)
    pool = np.arange(vocab_size, dtype=np.int64)
    special = getattr(tokenizer, "all_special_ids", None) or []
    if special:
        pool = np.setdiff1d(pool, np.asarray(special, dtype=np.int64))
    return pool


def _tokenizer_vocab_size(tokenizer: Tokenizer) -> Optional[int]:
    try:
        return len(tokenizer)  # type: ignore[arg-type]  # HF: includes added tokens
    except TypeError:
        return getattr(tokenizer, "vocab_size", None)


def _uniform_lens(rng: np.random.Generator, n: int, length: int, ratio: float) -> np.ndarray:
    low = max(1, math.floor(length * (1 - ratio)))
    high = max(low, math.ceil(length * (1 + ratio)))
    return rng.integers(low, high + 1, size=n)


def _lognormal_lens(rng: np.random.Generator, n: int, mu: float, sigma: float,
                    max_len: int) -> np.ndarray:
    lens = np.rint(rng.lognormal(mu, sigma, size=n)).astype(np.int64)
    return np.clip(lens, SHAREGPT_MIN_LEN, max_len)


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}.")
