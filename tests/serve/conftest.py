"""Shared fixtures for the server tests: a tiny checkpoint and a live uvicorn server."""

from __future__ import annotations

import shutil
import socket
import sys
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
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Special tokens (ids 0-5, the end ids among them) never drawn: generations run to max_tokens.
NO_STOP = {str(i): -100 for i in range(6)}


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


def start_server(app, root_path: str = "") -> LiveServer:
    """Run ``app`` under uvicorn on 127.0.0.1 in a background thread."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", root_path=root_path
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", app, server, thread)


def wait_for(cond, timeout: float = 10.0) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def free_port_number() -> int:
    return free_port()


@pytest.fixture(scope="session")
def wait_healthy():
    """``wait(base_url, proc)``: poll /health until 200; fail if ``proc`` exits first or
    two minutes pass (a `glassbox serve` subprocess starting)."""
    import httpx

    def wait(base: str, proc, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.2)

    return wait


@pytest.fixture(scope="session")
def glassbox_cli() -> str:
    """The installed `glassbox` command (the venv's, when tests run from one)."""
    exe = Path(sys.executable).parent / "glassbox"
    return str(exe) if exe.exists() else shutil.which("glassbox")


def slow_down(srv, seconds: float) -> None:
    """Make every engine step take ``seconds`` longer (a stand-in for a big model)."""
    engine = srv.app.state.models["tiny"].engine.engine
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    engine.step = slow_step


@pytest.fixture(scope="session")
def slower():
    """The ``slow_down`` helper, for test modules (conftest is not importable by name)."""
    return slow_down


@pytest.fixture(scope="session")
def wait_until():
    """The ``wait_for`` poller, for test modules (conftest is not importable by name)."""
    return wait_for


@pytest.fixture(scope="session")
def start_live():
    """The ``start_server`` helper, for module-scoped servers built by a test module."""
    return start_server


@pytest.fixture(scope="session")
def tiny_diffusion():
    """A random class-conditioned 8x8 denoiser behind the diffusion pipeline."""
    from glassbox.diffusion.model import Denoiser, DiffusionConfig
    from glassbox.diffusion.pipeline import DiffusionPipeline
    from glassbox.diffusion.unet import UNetConfig

    torch.manual_seed(0)
    unet = UNetConfig(image_size=8, in_channels=3, channels=8, channel_mults=(1, 2),
                      attn_resolutions=(4,), heads=2, groups=4, num_classes=3)  # fmt: skip
    model = Denoiser(DiffusionConfig(unet=unet, text=None, class_names=["red", "green", "blue"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return DiffusionPipeline(model.eval())


@pytest.fixture(scope="session")
def tiny_vlm(tiny_ckpt):
    """A random vision-language run on the tiny language model (16-px images, 5 slots)."""
    from glassbox.checkpoint import load_model_dir
    from glassbox.serve.endpoints.playground_vision import VisionRun
    from glassbox.vision.clip import ClipConfig
    from glassbox.vision.vlm import VisionLanguageModel

    lm, tok, _ = load_model_dir(tiny_ckpt, "cpu")
    cfg = ClipConfig(image_size=16, patch=8, vision_dim=16, vision_layers=1, vision_heads=2,
                     stem="patch")  # fmt: skip
    torch.manual_seed(0)
    return VisionRun(VisionLanguageModel(lm, cfg, pool=1).eval(), tok)  # 1 + 2x2 = 5 slots


@pytest.fixture(scope="session")
def no_stop() -> dict[str, float]:
    """logit_bias that keeps the end tokens from being drawn: runs go to max_tokens."""
    return dict(NO_STOP)


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

    def make(root_path: str = "", **kwargs) -> LiveServer:
        srv = start_server(build_app(tiny_ckpt, **kwargs), root_path)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()
