"""Test servers: a tiny model trained to think out loud, and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from sputnik.config import ModelConfig
from sputnik.model import Transformer
from sputnik.serve.config import ServeConfig
from sputnik.web.app import build_app

THOUGHT, ANSWER = "Two plus two makes four.\n", "The answer is 4."
REPLY = f"<think>\n{THOUGHT}</think>\n\n{ANSWER}"
USERS = ["What is 2 + 2?", "Hi", "Tell me something.", "안녕하세요", "Write a poem about the sea.", "x"]


def memorize(rows: list[tuple[list[int], list[int]]], vocab_size: int, max_seq_len: int, steps: int):
    """A tiny llama trained (seed 0) to answer each prompt with its reply: (model, last loss). Loss on reply tokens."""
    cfg = ModelConfig(family="llama", vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      inter_dim=128, max_seq_len=max_seq_len, tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(cfg)
    L = max(len(p) + len(r) for p, r in rows)
    x = torch.zeros(len(rows), L, dtype=torch.long)
    y = torch.full((len(rows), L), -100)
    for i, (p, r) in enumerate(rows):
        x[i, : len(p) + len(r)] = torch.tensor(p + r)
        y[i, len(p) - 1 : len(p) + len(r) - 1] = torch.tensor(r)
    target = y != -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        logits = model.lm_head(model.model.norm(model.hidden(x)[target]))
        loss = torch.nn.functional.cross_entropy(logits, y[target])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, loss


@pytest.fixture(scope="session")
def think_model(tmp_path_factory, default_tokenizer) -> Path:
    """A tiny model trained here to answer every chat with REPLY: a test model whose output holds <think>."""
    from sputnik.checkpoint import save_model

    tok = default_tokenizer
    end = tok.token_to_id("<|im_end|>")
    rows = []
    for system in (None, "You are helpful."):
        for user in USERS:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
            rows.append((tok.apply_chat_template(msgs, tokenize=True), tok.encode(REPLY) + [end]))
    model, loss = memorize(rows, tok.vocab_size, max_seq_len=512, steps=60)
    assert loss.item() < 0.05, f"the test model did not learn its reply (loss {loss.item():.3f})"
    path = tmp_path_factory.mktemp("think-model")
    save_model(model, path, tokenizer=tok)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """A real uvicorn server (the whole app, as `sputnik serve` builds it) on a free loopback port, in a thread of this
    process."""

    def __init__(self, cfg: ServeConfig, loader=None):
        cfg.port = free_port()
        self.cfg = cfg
        self.app = build_app(cfg) if loader is None else build_app(cfg, loader=loader)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=cfg.host, port=cfg.port, log_level="warning"))
        self.url = f"http://{cfg.host}:{cfg.port}"

    def __enter__(self) -> Live:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 120) -> Live:
        end = time.monotonic() + timeout
        while httpx.get(f"{self.url}/health").status_code != 200:
            assert time.monotonic() < end, "server never became ready"
            time.sleep(0.05)
        return self

    def client(self, key: str = "none", **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kw)

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


