"""Helpers for the server tests: a tiny Llama checkpoint with a real (tiny) byte-level BPE
tokenizer and chat template, and a `servelm serve` subprocess on a free port."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

try:
    import httpx
except ImportError:  # this environment ships the fork the openai client uses
    import httpx2 as httpx  # type: ignore[no-redef]

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
_CORPUS = ["The quick brown fox jumps over the lazy dog.",
           "Hello world! How are you today? I am fine, thank you.",
           "Serving language models fast needs paged attention and continuous batching.",
           "Once upon a time there was a small model that generated random text.",
           "0123456789 + - * / = ( ) [ ] { } < > , . ; : ' \" ! ? \n"] * 20


def make_tiny_model(dirname: str) -> str:
    """A random 2-layer Llama whose vocab matches a 384-token byte-level BPE tokenizer."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dirname)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(fast),
                         max_position_embeddings=512, initializer_range=0.2,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         tie_word_embeddings=False)
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(dirname)
    return dirname


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def child_pids(pid: int, cmdline_has: bytes = b"") -> list[int]:
    """Live child processes of ``pid`` whose command line contains ``cmdline_has`` (Linux)."""
    out = []
    for c in os.listdir("/proc"):
        if not c.isdigit():
            continue
        try:
            with open(f"/proc/{c}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{c}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == pid and cmdline_has in cmdline:
            out.append(int(c))
    return sorted(out)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m servelm.cli serve ...` on 127.0.0.1; stopped (bounded) by close()."""

    def __init__(self, args: list[str], startup_timeout_s: float = 180.0,
                 env: Optional[dict] = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "servelm.cli", "serve", *args, "--port", str(self.port)]
        # a file, not a pipe: a pipe nobody reads would block a chatty server
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.close()
        raise RuntimeError("server did not become healthy in time")

    def core_pids(self) -> list[int]:
        """The engine core processes (one per data-parallel replica): the server's spawned
        children (not the resource tracker)."""
        return child_pids(self.proc.pid, b"spawn_main")

    def core_pid(self) -> int:
        pids = self.core_pids()
        if not pids:
            raise RuntimeError("engine core process not found")
        return pids[0]

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def close(self) -> str:
        """Stops the server (SIGTERM, then SIGKILL); returns what it printed."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        out = self.output()
        self.log.close()
        return out
