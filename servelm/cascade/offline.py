"""``CascadeLLM``: two offline engines, the small one first.

Every prompt goes to the small model (asking for the sampled tokens' logprobs, which the
confidence needs); the completions whose confidence is below the threshold are sent again, as
the same prompts with the same sampling parameters, to the large model, whose outputs replace
them. Both engines live in one process (memory split between them by their own settings)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from servelm.cascade.config import CascadeConfig, confidence, small_model_params
from servelm.outputs import RequestOutput
from servelm.sampling_params import SamplingParams


@dataclass
class CascadeResult:
    """One prompt's answer: the output returned (the small model's or the large model's), which
    model gave it, the small model's confidence, and the tokens each model generated for it."""

    output: RequestOutput
    model: str  # "small" | "large"
    confidence: float
    small_tokens: int
    large_tokens: int


class CascadeLLM:
    def __init__(self, small: Optional[str], large: Optional[str], threshold: float,
                 criterion: str = "mean_prob", small_args: Optional[dict] = None,
                 large_args: Optional[dict] = None, **common: Any) -> None:
        """small, large: models as ``LLM`` takes them; ``common`` engine args go to both,
        ``small_args`` / ``large_args`` to one (say, quantization or memory for each)."""
        from servelm import LLM
        self.config = CascadeConfig(threshold, criterion)
        self.small = LLM(small, **{**common, **(small_args or {})})
        self.large = LLM(large, **{**common, **(large_args or {})})
        vs = self.small.engine.config.model.vocab_size
        vl = self.large.engine.config.model.vocab_size
        if vs != vl:
            self.shutdown()
            raise ValueError(f"a cascade's models must share a vocabulary: the small model has "
                             f"{vs} tokens, the large {vl}.")
        self.num_escalated = 0
        self.num_requests = 0

    def generate(self, prompts: Union[Any, Sequence[Any]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None
                 ) -> list[CascadeResult]:
        from servelm.engine.llm import _as_prompt_list
        plist = _as_prompt_list(prompts)
        sp = sampling_params or SamplingParams()
        params = [sp] * len(plist) if isinstance(sp, SamplingParams) else list(sp)
        if len(params) != len(plist):
            raise ValueError(f"got {len(plist)} prompts but {len(params)} sampling params.")
        for p in params:
            if p.n != 1:
                raise ValueError("a cascade answers with one completion per prompt: n must be 1.")
        first = self.small.generate(plist, [small_model_params(p) for p in params],
                                    use_tqdm=False)
        conf = [confidence(o.outputs[0], self.config.criterion) for o in first]
        unsure = [i for i, c in enumerate(conf) if c < self.config.threshold]
        second = (self.large.generate([plist[i] for i in unsure], [params[i] for i in unsure],
                                      use_tqdm=False) if unsure else [])
        results = []
        for i, o in enumerate(first):
            small_n = len(o.outputs[0].token_ids)
            if params[i].logprobs is None:  # asked for none: not returned
                o.outputs[0].logprobs = None
            results.append(CascadeResult(o, "small", conf[i], small_n, 0))
        for i, o in zip(unsure, second):
            r = results[i]
            results[i] = CascadeResult(o, "large", r.confidence, r.small_tokens,
                                       len(o.outputs[0].token_ids))
        self.num_requests += len(plist)
        self.num_escalated += len(unsure)
        return results

    def shutdown(self) -> None:
        for llm in (self.small, self.large):
            llm.engine.core.shutdown()
