"""cpu_offload_gb: the first decoder layers' weights live in host memory and stream through two
device buffers ahead of use. On the CPU the device is host memory too, so only the mechanism is
checked: greedy output token-identical to transformers with one, and with all (an odd number)
of the layers offloaded, under preemption and prefix hits, and when layer-skip drafting runs
the first layers out of the usual order."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_all_blocks_free, make_engine, random_prompts, run_to_completion
from tests.e2e.test_engine_vs_hf import GREEDY, check, hf_refs



def test_one_offloaded_layer(tiny_model_factory):
    d, model = tiny_model_factory("llama")
    eng = make_engine(d, cpu_offload_gb=1e-6)  # less than a layer: one layer
    runner = eng.core.executor.runner
    st = runner.streamer
    assert len(st.layers) == 1 and st.layers[0] is runner.model.layers[0]
    layer_bytes = sum(p.numel() * p.element_size() for p in runner.model.layers[1].parameters())
    assert st.host_bytes == layer_bytes and st.device_bytes == 2 * layer_bytes
    # its parameters are views of a staging buffer, not tensors of their own
    slots = {t.data_ptr() for s in st.slots for t in s}
    assert all(p.data_ptr() in slots for p in runner.model.layers[0].parameters())
    prompts = random_prompts(5, (3, 17, 40, 9, 1), seed=30)
    check(run_to_completion(eng, prompts, GREEDY), hf_refs(model, prompts))
    assert_all_blocks_free(eng)


def test_all_of_an_odd_number_of_layers_with_preemption_and_prefix_hits(tmp_path):
    import transformers as tf

    from tests.conftest import TINY
    torch.manual_seed(31)
    model = tf.AutoModelForCausalLM.from_config(
        tf.LlamaConfig(**{**TINY, "num_hidden_layers": 3}), dtype=torch.float32).eval()
    model.save_pretrained(tmp_path)
    shared = random_prompts(1, (20,), seed=32)[0]
    prompts = [shared + t for t in random_prompts(5, (3, 30, 1, 12, 41), seed=33)]
    eng = make_engine(str(tmp_path), cpu_offload_gb=4, num_gpu_blocks_override=36,
                      max_num_seqs=3)
    assert len(eng.core.executor.runner.streamer.layers) == 3
    outs = run_to_completion(eng, prompts, GREEDY)
    st = eng.stats()
    assert st.num_preemptions > 0 and st.prefix_cache_hits > 0
    check(outs, hf_refs(model, prompts))


def test_layer_skip_drafting_through_offloaded_layers(tiny_model_factory):
    d, model = tiny_model_factory("llama")
    eng = make_engine(d, cpu_offload_gb=4, speculative_config={
        "method": "layer_skip", "num_speculative_tokens": 2, "draft_layers": 1})
    prompts = random_prompts(3, (6, 21, 11), seed=34)
    check(run_to_completion(eng, prompts, GREEDY), hf_refs(model, prompts))


def test_offload_refusals(tiny_model_factory):
    from servelm.config import EngineArgs
    from servelm.worker.offload import LayerStreamer
    d, _ = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="cpu_offload_gb with quantization='int8' is not "
                                         "supported yet"):
        EngineArgs(model=d, device="cpu", cpu_offload_gb=1,
                   quantization="int8").create_engine_config()
    with pytest.raises(ValueError, match="cpu_offload_gb must be >= 0"):
        EngineArgs(model=d, device="cpu", cpu_offload_gb=-1).create_engine_config()
    with pytest.raises(ValueError, match="differ in their parameters"):
        LayerStreamer([torch.nn.Linear(4, 4), torch.nn.Linear(4, 8)], torch.device("cpu"))
