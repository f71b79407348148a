"""vLLM's --disable-custom-all-reduce reaches the ParallelConfig (the one-shot peer-memory
all-reduce is built only on GPUs: tests/e2e/test_one_shot_allreduce.py); the one-shot's size
limit follows the world size; a CPU group never builds one."""
from __future__ import annotations

import argparse

import torch

from servelm.config import EngineArgs
from servelm.distributed.one_shot import build_one_shot, default_max_bytes


def test_flag_reaches_parallel_config(tiny_model_factory):
    d, _ = tiny_model_factory("llama")
    p = argparse.ArgumentParser()
    EngineArgs.add_cli_args(p)
    for argv, want in (([d], False), ([d, "--disable-custom-all-reduce"], True)):
        args = EngineArgs.from_cli_args(p.parse_args(argv + ["--device", "cpu"]))
        assert args.disable_custom_all_reduce is want
        assert args.create_engine_config().parallel.disable_custom_all_reduce is want


def test_limits_and_cpu():
    assert default_max_bytes(2) == 4 << 20 and default_max_bytes(4) == 1 << 20
    assert build_one_shot(None, 0, 2, torch.device("cpu")) is None  # gloo groups: plain
    assert build_one_shot(None, 0, 1, torch.device("cuda", 0)) is None  # alone: nothing to sum
