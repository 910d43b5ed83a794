"""Shared fixtures for the server tests: a tiny checkpoint and a live uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import uvicorn

from glassbox import checkpoint
from glassbox.config import ModelConfig
from glassbox.model import Transformer
from glassbox.tokenizer import Tokenizer

TEXTS = [
    "hello world, this is a small test of the glassbox server. " * 20,
    '{"name": "ada", "age": 36, "tags": ["x", "y"], "ok": true, "none": null}\n' * 20,
    "The quick brown fox jumps over the lazy dog 0123456789.\n" * 20,
]
API_KEY = "test-key"


def make_checkpoint(out: Path, context_length: int = 128, seed: int = 0) -> Path:
    """A random tiny model (peaked logits, so greedy text varies) with a real tokenizer."""
    tok = Tokenizer.train(TEXTS, vocab_size=320, show_progress=False)
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name(
        "test", vocab_size=tok.vocab_size, context_length=context_length, init_std=0.2
    )
    model = Transformer(cfg).eval()
    checkpoint.save_model_dir(out, model, tok, "test")
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def start_server(app) -> LiveServer:
    """Run ``app`` under uvicorn on 127.0.0.1 in a background thread."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", app, server, thread)


def build_app(ckpt: Path, **kwargs):
    from glassbox.serve.app import create_app, load_served_models

    engine_kw = {k: kwargs.pop(k) for k in ("max_seqs", "max_queue") if k in kwargs}
    models = load_served_models([f"tiny={ckpt}"], device="cpu", **engine_kw)
    return create_app(models, **kwargs)


@pytest.fixture(scope="module")
def live(tiny_ckpt) -> Iterator[LiveServer]:
    """A server with an API key, shared by a test module."""
    srv = start_server(build_app(tiny_ckpt, api_key=API_KEY))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


@pytest.fixture
def make_server(tiny_ckpt):
    """Factory: start a server on the tiny checkpoint with options; stopped at teardown."""
    started: list[LiveServer] = []

    def make(**kwargs) -> LiveServer:
        srv = start_server(build_app(tiny_ckpt, **kwargs))
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()
