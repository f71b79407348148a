"""The data-parallel router (prefix affinity bounded by load), the merged scheduler stats and
each replica's share of the machine."""
from __future__ import annotations

import dataclasses

import pytest

from servelm.core.step import SchedulerStats
from servelm.engine.dp_router import PrefixRouter, RouterConfig, prefix_hashes

CFG = RouterConfig(block_size=4, max_prefix_blocks=8, blocks_per_replica=64, balance_abs=4,
                   balance_rel=1.5)


def test_prefix_hashes_chain_whole_blocks():
    a = prefix_hashes(list(range(10)), CFG)  # 2 whole blocks of 4
    assert len(a) == 2
    b = prefix_hashes(list(range(8)) + [99, 98], CFG)
    assert a == b  # the partial tail block is not hashed
    c = prefix_hashes([0, 1, 2, 3, 9, 5, 6, 7], CFG)
    assert c[0] == a[0] and c[1] != a[1]  # chained: a change in block 1 changes h[1] only
    assert prefix_hashes(list(range(400)), CFG).__len__() == 8  # max_prefix_blocks


def test_new_prompts_go_to_the_least_loaded():
    r = PrefixRouter(3, CFG)
    assert r.route([1] * 3, [5, 2, 7], [True] * 3) == 1  # shorter than a block: load only
    assert r.route(list(range(100, 120)), [0, 0, 0], [True] * 3) == 0  # ties: the lowest index


def test_shared_prefixes_stick_to_their_replica_until_it_is_too_busy():
    r = PrefixRouter(2, CFG)
    system = list(range(50, 66))  # 4 blocks
    assert r.route(system + [1, 2], [0, 3], [True, True]) == 0
    # the same prefix: replica 0 though it is busier, within the balance thresholds
    assert r.route(system + [7, 7, 7], [4, 1], [True, True]) == 0
    # far busier (more than 4 sequences and 1.5x): the least-loaded one, which learns it
    assert r.route(system + [8], [20, 2], [True, True]) == 1
    assert r.route(system + [9], [20, 19], [True, True]) in (0, 1)
    # the longer match wins among replicas that both have the prefix
    longer = system + list(range(200, 208))
    assert r.route(longer, [0, 0], [True, True]) == 0  # nobody had blocks 5-6: tie on depth 4
    assert r.route(longer + [1], [3, 0], [True, True]) == 0  # replica 0 now has 6 blocks


def test_unavailable_replicas_are_skipped_and_forgotten_ones_lose_affinity():
    r = PrefixRouter(2, CFG)
    p = list(range(30, 46))
    assert r.route(p, [0, 0], [True, True]) == 0
    assert r.route(p, [0, 0], [False, True]) == 1
    r.forget(0)
    r.forget(1)
    assert r.route(p, [3, 0], [True, True]) == 1  # no affinity left: least loaded
    with pytest.raises(ValueError, match="no replica"):
        r.route(p, [0, 0], [False, False])


def test_lru_keeps_the_newest_prefix_blocks():
    r = PrefixRouter(1, dataclasses.replace(CFG, blocks_per_replica=4))
    for i in range(10):
        r.route(list(range(i * 100, i * 100 + 8)), [0], [True])
    assert len(r.seen[0]) == 4


def test_merge_stats_sums_counts_and_averages_kv_usage():
    from servelm.engine.dp_client import merge_stats
    a = SchedulerStats(2, 1, 0.5, 3, 10, 4, 0, 1, 4, 2, [2, 0])
    b = SchedulerStats(1, 0, 0.25, 0, 6, 6, 1, 2, 8, 5, [3, 1, 1])
    m = merge_stats([a, b])
    assert (m.num_running, m.num_waiting, m.num_preemptions) == (3, 1, 3)
    assert m.kv_cache_usage == pytest.approx(0.375)
    assert (m.prefix_cache_queries, m.prefix_cache_hits, m.num_swapped) == (16, 10, 1)
    assert (m.spec_num_drafts, m.spec_num_draft_tokens, m.spec_num_accepted_tokens) == (3, 12, 7)
    assert m.spec_accepted_per_pos == [5, 1, 1]


def test_replica_configs_split_the_machine(tiny_model_factory):
    from servelm.config import EngineArgs
    from servelm.engine.dp_client import replica_config
    d, _ = tiny_model_factory("llama")
    cfg = EngineArgs(model=d, device="cpu", data_parallel_size=2).create_engine_config()
    cfg = dataclasses.replace(cfg, threads=2, cpus=(0, 1, 2))
    r0, r1 = replica_config(cfg, 0), replica_config(cfg, 1)
    assert (r0.threads, r0.cpus, r1.threads, r1.cpus) == (1, (0, 2), 1, (1, 2))
    assert r0.parallel.data_parallel_size == r1.parallel.data_parallel_size == 1
    gpu = dataclasses.replace(cfg, device="cuda",
                              parallel=dataclasses.replace(cfg.parallel, tensor_parallel_size=2))
    assert [replica_config(gpu, i).device for i in range(2)] == ["cuda:0", "cuda:2"]


def test_offline_engines_refuse_data_parallel(tiny_model_factory):
    from servelm import LLM
    d, _ = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="data_parallel_size=2: replicas run under `servelm "
                                         "serve`"):
        LLM(d, device="cpu", skip_tokenizer_init=True, data_parallel_size=2)


def test_an_adapter_has_its_own_prefix_affinity():
    """The same prompt under a LoRA adapter (salted) is another prefix: its KV is cached
    apart, so the replica holding the base model's copy has no claim on it."""
    assert prefix_hashes(list(range(8)), CFG, b"lora:3") != prefix_hashes(list(range(8)), CFG)
    r = PrefixRouter(2, CFG)
    prompt = list(range(300, 316))
    assert r.route(prompt, [0, 1], [True, True]) == 0
    assert r.route(prompt, [3, 0], [True, True], b"lora:3") == 1  # no affinity: least loaded
    assert r.route(prompt, [3, 0], [True, True]) == 0  # the base model's stays with replica 0
