"""The server's cascade: an engine client over two engine clients (``servelm serve --cascade
SMALL LARGE``), answering every request with the small model and escalating the unsure ones.

Streams escalate before their first token: the small model's answer is held until it is judged,
then sent whole (confident) or replaced by the large model's stream. Everything but generation
(tokenizer, limits, telemetry) is the large model's: prompts are processed once, by its input
processor, and both models must share its vocabulary."""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from servelm.cascade.config import CascadeConfig, confidence, small_model_params
from servelm.outputs import RequestOutput
from servelm.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class CascadeInfo:
    """Which model answered a request, the small model's confidence, and the tokens the small
    model spent on it when the large one answered (usage counts both)."""

    model: str  # "small" | "large"
    confidence: float
    small_prompt_tokens: int = 0
    small_completion_tokens: int = 0


class CascadeClient:
    def __init__(self, small: Any, large: Any, config: CascadeConfig) -> None:
        self.small, self.large, self.cascade = small, large, config
        self.num_requests = 0
        self.num_escalated = 0
        self.latency: dict[str, list[float]] = {"small": [0, 0.0], "large": [0, 0.0]}

    def _done(self, path: str, start: float) -> None:
        n_s = self.latency[path]
        n_s[0] += 1
        n_s[1] += time.monotonic() - start

    def __getattr__(self, name: str) -> Any:  # the large model's surface (config, tokenizer..)
        return getattr(self.large, name)

    # ---- failure (server/recovery.py): either core's death is the cascade's ----------------
    @property
    def on_dead(self) -> Any:
        return self.large.on_dead

    @on_dead.setter
    def on_dead(self, fn: Any) -> None:
        self.small.on_dead = self.large.on_dead = fn

    async def restart(self, listener: Any) -> "CascadeClient":
        """The dead core(s) replaced by new ones, in place (the live one keeps serving): this
        same client, so the caller shuts nothing down."""
        for name in ("small", "large"):
            old = getattr(self, name)
            if not old.is_healthy:
                new = await old.restart(listener)
                new.on_dead = old.on_dead
                setattr(self, name, new)
                await old.shutdown()
        return self

    @property
    def is_healthy(self) -> bool:
        return self.small.is_healthy and self.large.is_healthy

    def check_health(self) -> None:
        self.small.check_health()
        self.large.check_health()

    async def generate(self, request_id: str, prompt: Any, params: Optional[SamplingParams] = None,
                       **kw: Any) -> AsyncIterator[RequestOutput]:
        from servelm.engine.async_client import ProcessedPrompt
        if not isinstance(prompt, ProcessedPrompt):
            prompt = self.large.process_input(prompt, params or SamplingParams(),
                                              kw.get("add_special_tokens", True))
        kw.pop("add_special_tokens", None)
        start = time.monotonic()
        p = prompt.params
        if p.n != 1:
            raise ValueError("a cascade answers with one completion per prompt: n must be 1.")
        # only the final output is needed
        sp = dataclasses.replace(small_model_params(p), output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        # (aclosing: a request cancelled while the small model runs aborts it there at once)
        async with contextlib.aclosing(self.small.generate(
                f"{request_id}-small", ProcessedPrompt(prompt.text, prompt.token_ids, sp),
                **kw)) as gen:
            async for o in gen:
                final = o
        conf = confidence(final.outputs[0], self.cascade.criterion)
        self.num_requests += 1
        if conf >= self.cascade.threshold:
            if p.logprobs is None:
                final.outputs[0].logprobs = None
            final.request_id = request_id
            final.cascade = CascadeInfo("small", conf)
            self._done("small", start)
            yield final
            return
        self.num_escalated += 1
        info = CascadeInfo("large", conf, len(final.prompt_token_ids),
                           len(final.outputs[0].token_ids))
        async with contextlib.aclosing(self.large.generate(request_id, prompt, **kw)) as gen:
            async for o in gen:
                o.cascade = info
                if o.finished:
                    self._done("large", start)
                yield o

    async def abort(self, request_id: str) -> None:
        await self.small.abort(f"{request_id}-small")
        await self.large.abort(request_id)

    async def get_stats(self, timeout_s: float = 5.0):
        from servelm.engine.dp_client import merge_stats
        s = merge_stats([await self.small.get_stats(timeout_s),
                         await self.large.get_stats(timeout_s)])
        s.cascade_requests, s.cascade_escalations = self.num_requests, self.num_escalated
        s.cascade_latency = {k: list(v) for k, v in self.latency.items()}
        return s

    def end_requests(self, err: BaseException) -> int:
        return self.small.end_requests(err) + self.large.end_requests(err)

    def num_sequences_in_flight(self) -> int:
        return self.small.num_sequences_in_flight() + self.large.num_sequences_in_flight()

    async def shutdown(self) -> None:
        await self.small.shutdown()
        await self.large.shutdown()
