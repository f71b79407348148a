"""A step's output while its tokens may still be on the device: the runner launches a step and
returns at once; ``result()`` waits for that step only (an event recorded after its sampled ids
were copied to pinned host memory), then packs the ModelRunnerOutput. What the executor's
non-blocking ``execute`` hands out."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from servelm.core.step import ModelRunnerOutput
from servelm.sampling import SamplerOutput
from servelm.worker.logprobs import SampledLogprobs


def to_host(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class PendingOutput:
    """One token per sampling request (no drafts: those are verified on the host at once)."""

    def __init__(self, out: ModelRunnerOutput, req_ids: list[str], logprobs_k: np.ndarray,
                 so: Optional[SamplerOutput],
                 on_tokens: Optional[Callable[[np.ndarray], None]] = None,
                 arrive: Optional[Callable[[], None]] = None,
                 landed: Optional[Callable[[ModelRunnerOutput], None]] = None) -> None:
        self.out = out  # filled so far: prompt logprobs
        self.req_ids = req_ids
        self.logprobs_k = logprobs_k  # [L] top logprobs wanted per row, -1 none
        self.on_tokens = on_tokens  # the runner's bookkeeping once the ids are on the host
        # waits until the ids themselves are there (an earlier pipeline stage receives them
        # from the last one; CPU tensors, read in place)
        self.arrive = arrive
        self.landed = landed  # fills in what else the step copied to the host (after the wait)
        self._done = so is None
        if so is not None:
            # start the copies now, behind the step's work; wait for them in result()
            self.token_ids = to_host(so.token_ids)
            self.so = SamplerOutput(self.token_ids, to_host(so.sampled_logprob),
                                    to_host(so.sampled_rank), to_host(so.top_ids),
                                    to_host(so.top_logprobs))
            self.event = None
            if so.token_ids.is_cuda:
                self.event = torch.cuda.Event()
                self.event.record()

    @classmethod
    def ready(cls, out: ModelRunnerOutput) -> "PendingOutput":
        return cls(out, [], np.zeros(0, dtype=np.int64), None)

    def done(self) -> bool:
        return self._done or self.event is None or self.event.query()

    def result(self) -> ModelRunnerOutput:
        if self._done:
            return self.out
        if self.arrive is not None:
            self.arrive()
        if self.event is not None:
            self.event.synchronize()  # this step only: later launched steps keep running
        tokens = self.token_ids.numpy()
        if self.on_tokens is not None:
            self.on_tokens(tokens)
        toks = tokens.tolist()
        out = self.out
        out.sampled_token_ids = {rid: [t] for rid, t in zip(self.req_ids, toks)}
        if self.so.sampled_logprob is not None:
            lps = SampledLogprobs(self.so)
            for i in np.nonzero(self.logprobs_k >= 0)[0].tolist():
                out.logprobs[self.req_ids[i]] = [lps.row(i, toks[i], int(self.logprobs_k[i]))]
        if self.landed is not None:
            self.landed(out)
        self._done = True
        return out
