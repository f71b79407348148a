"""SERVELM_TORCH_PROFILER_DIR / _STEPS: the runner's step window is traced to DIR/rank{R}.json
(with the step annotations in it); a malformed window is a ValueError naming the variable."""
from __future__ import annotations

import json

import pytest
import torch

from servelm.worker.step_profiler import StepProfiler, step_profiler_from_env, step_range


def test_window_is_traced(tmp_path):
    prof = StepProfiler(str(tmp_path), 1, 3, rank=1)
    for _ in range(4):  # steps 0..3: 1 and 2 profiled, written when 3 starts
        prof.on_step()
        with step_range(prof, "servelm.prepare_inputs"):  # a range only while recording
            torch.randn(64, 64) @ torch.randn(64, 64)
    trace = json.loads((tmp_path / "rank1.json").read_text())
    marks = [e for e in trace["traceEvents"] if e.get("name") == "servelm.prepare_inputs"]
    assert len(marks) == 2  # steps 1 and 2 only


def test_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SERVELM_TORCH_PROFILER_DIR", raising=False)
    assert step_profiler_from_env(0) is None
    monkeypatch.setenv("SERVELM_TORCH_PROFILER_DIR", str(tmp_path))
    monkeypatch.setenv("SERVELM_TORCH_PROFILER_STEPS", "5:9")
    p = step_profiler_from_env(2)
    assert (p.first, p.last, p.rank) == (5, 9, 2)
    for bad in ("5", "a:b", "9:5"):
        monkeypatch.setenv("SERVELM_TORCH_PROFILER_STEPS", bad)
        with pytest.raises(ValueError, match="SERVELM_TORCH_PROFILER_STEPS"):
            step_profiler_from_env(0)
