"""The engine core process `servelm serve` starts before it parses its arguments
(engine/core_launcher.py): which arguments start one, the model hint it pre-imports for, and
that one nobody takes goes away."""
from __future__ import annotations

import json
import time

from servelm.engine.core_launcher import CoreLauncher, _model_hint, _preimport


def test_model_hint(tmp_path):
    d = str(tmp_path)
    assert _model_hint([d, "--device", "cpu"]) == d
    assert _model_hint(["--device", "cpu", "--model", d]) == d
    assert _model_hint([f"--model={d}", "--port", "1"]) == d
    assert _model_hint(["--model", d + "/missing"]) is None
    assert _model_hint(["model.gguf", "--device", "cpu"]) is None  # not a directory
    assert _model_hint(["--device", "cpu"]) is None
    assert _model_hint([]) is None


def test_no_launcher_for_help_yaml_or_data_parallel(tmp_path):
    for argv in (["--help"], [str(tmp_path), "-h"], ["--config", "x.yaml"],
                 [str(tmp_path), "--data-parallel-size", "2"], [str(tmp_path), "-dp", "2"]):
        assert CoreLauncher.for_serve_argv(argv) is None, argv


def test_preimport_tolerates_bad_hints(tmp_path):
    (tmp_path / "config.json").write_text("not json")
    _preimport(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    _preimport(str(tmp_path))
    _preimport(None)


def test_unlaunched_launcher_exits_at_once_and_launches_once():
    launcher = CoreLauncher()
    proc = launcher._proc
    assert proc is not None and proc.is_alive()
    t = time.monotonic()
    launcher.close()  # at once, though it is still importing torch
    assert not proc.is_alive() and time.monotonic() - t < 3
    assert launcher.launch(()) is None  # closed: nothing left to launch
    launcher.close()  # idempotent
