"""/v1/embeddings through the official `openai` client: shapes, unit norm, the same
vectors as `glassbox rag`'s Embedder, base64, and 400s naming the parameter."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import torch

from glassbox.checkpoint import load_model_dir
from glassbox.rag.index import Embedder

API_KEY = "test-key"


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key=API_KEY, max_retries=0)


def test_vectors_are_unit_and_equal_the_embedder(client, tiny_ckpt):
    texts = ["hello world", "the quick brown fox", "a"]
    res = client.embeddings.create(model="tiny", input=texts)
    got = np.array([d.embedding for d in res.data], dtype=np.float32)
    model, tok, _ = load_model_dir(tiny_ckpt)
    want = Embedder(model, tok)(texts).numpy()
    assert got.shape == (3, model.cfg.d_model) and [d.index for d in res.data] == [0, 1, 2]
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert res.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)


def test_token_ids_single_string_and_base64(client, tiny_ckpt):
    model, tok, _ = load_model_dir(tiny_ckpt)
    ids = tok.encode("hello world")
    by_ids = client.embeddings.create(model="tiny", input=[ids]).data[0].embedding
    by_text = client.embeddings.create(model="tiny", input="hello world").data[0].embedding
    np.testing.assert_allclose(by_ids, by_text, atol=1e-6)
    # the client asks for base64 by default when numpy is present and decodes it itself
    b64 = client.embeddings.create(model="tiny", input="hello world", encoding_format="base64")
    vec = b64.data[0].embedding
    if isinstance(vec, str):  # older clients hand the string back
        import base64

        vec = np.frombuffer(base64.b64decode(vec), dtype="<f4")
    np.testing.assert_allclose(vec, by_text, atol=1e-6)
    torch.testing.assert_close(torch.tensor(by_text).norm(), torch.tensor(1.0))


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"input": []}, "input"),
        ({"input": [""]}, "input[0]"),
        ({"input": [[10**6]]}, "input[0]"),
        ({"input": "x", "dimensions": 3}, "dimensions"),
    ],
)
def test_errors_name_the_parameter(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny", **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
