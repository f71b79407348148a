"""torch.profiler over a window of engine steps on every rank, for finding where a step's time
goes (as vLLM's VLLM_TORCH_PROFILER_DIR): with

    SERVELM_TORCH_PROFILER_DIR=DIR SERVELM_TORCH_PROFILER_STEPS=FIRST:LAST

each rank's runner profiles its steps FIRST..LAST-1 (counted from its first step with tokens;
every rank runs the same steps, so the windows match) and writes a Chrome trace,
DIR/rank{R}.json (CPU ops, CUDA kernels, collectives), when step LAST starts. Off (no cost
beyond one check a step) when the variables are unset."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, ContextManager, Optional

logger = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, out_dir: str, first: int, last: int, rank: int) -> None:
        if not 0 <= first < last:
            raise ValueError(f"SERVELM_TORCH_PROFILER_STEPS must be FIRST:LAST with 0 <= FIRST "
                             f"< LAST, got {first}:{last}.")
        self.out_dir, self.first, self.last, self.rank = out_dir, first, last, rank
        self.step = 0
        self.prof: Optional[Any] = None

    def on_step(self) -> None:
        """Called as each step with tokens starts."""
        if self.step == self.first:
            import torch
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                             if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.start()
        elif self.step == self.last and self.prof is not None:
            import torch
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.stop()
            os.makedirs(self.out_dir, exist_ok=True)
            path = os.path.join(self.out_dir, f"rank{self.rank}.json")
            self.prof.export_chrome_trace(path)
            logger.info("profiled steps %d..%d: %s", self.first, self.last - 1, path)
            self.prof = None
        self.step += 1


def step_range(profiler: Optional[StepProfiler], name: str) -> ContextManager:
    """A named range in the trace while ``profiler`` records; nothing otherwise (the per-step
    path pays no record_function when no one profiles)."""
    if profiler is None or profiler.prof is None:
        return contextlib.nullcontext()
    import torch
    return torch.profiler.record_function(name)


def step_profiler_from_env(rank: int) -> Optional[StepProfiler]:
    out_dir = os.environ.get("SERVELM_TORCH_PROFILER_DIR")
    if not out_dir:
        return None
    steps = os.environ.get("SERVELM_TORCH_PROFILER_STEPS", "10:20")
    try:
        first, last = (int(x) for x in steps.split(":"))
    except ValueError:
        raise ValueError(f"SERVELM_TORCH_PROFILER_STEPS must be FIRST:LAST, got {steps!r}.")
    return StepProfiler(out_dir, first, last, rank)
