"""Images through the OpenAI-compatible API, driven with the official `openai` client
against a live server: a vision-language run answers chat requests with image_url
parts (the same greedy answer as `glassbox vlm ask`), a contrastive run embeds texts
and images into one space, and bad images get 400s naming the field."""

from __future__ import annotations

import base64
import io
import subprocess

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from glassbox.checkpoint import load_checkpoint
from glassbox.serve.limits import ServeLimits
from glassbox.vision.scenes import load_image
from glassbox.vision.train import VLMTrainConfig, train_vlm
from glassbox.vision.vlm import answer, image_messages

KEY = "test-key"


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def scene(colour: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (48, 48), (255, 255, 255))
    img.paste(colour, (10, 10, 30, 30))
    return img


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt, clip_run) -> dict[str, str]:
    """The tiny contrastive run and a vision-language run on the tiny chat model (real
    training code)."""
    vlm = tmp_path_factory.mktemp("vision-serve") / "vlm"
    train_vlm(VLMTrainConfig(base=str(tiny_ckpt), vision=clip_run, out=str(vlm),
                             num_images=32, batch_size=4, max_steps=1, eval_limit=1,
                             device="cpu"))  # fmt: skip
    return {"clip": clip_run, "vlm": str(vlm), "lm": str(tiny_ckpt)}


@pytest.fixture(scope="module")
def live(runs, start_live, tmp_path_factory):
    from glassbox.serve.app import create_app, load_served_models

    specs = [f"{name}={path}" for name, path in runs.items()]
    models = load_served_models(specs, device="cpu", dtype="fp32", max_seqs=4)
    limits = ServeLimits(max_images=2, max_image_bytes=20_000, max_image_pixels=300 * 300)
    arena = tmp_path_factory.mktemp("arena")
    srv = start_live(create_app(models, api_key=KEY, limits=limits, playground=True,
                                arena_dir=arena))  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key=KEY, max_retries=0)


def ask(client, url: str, question: str = "What colour is the square?", **kw):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return client.chat.completions.create(
        model="vlm", messages=[{"role": "user", "content": content}], **kw
    )


def test_models_list_what_each_run_reads(client):
    kinds = {m.id: m.model_extra["glassbox"]["kind"] for m in client.models.list().data}
    assert kinds == {"clip": "contrastive", "vlm": "vision-language", "lm": "language"}


def test_chat_with_an_image_answers_as_vlm_ask_does(client, runs):
    """Greedy, the served answer equals the offline one: the image vectors reached the
    engine's prefill at the image slots."""
    loaded = load_checkpoint(runs["vlm"])
    model, tok = loaded.model, loaded.tokenizer
    wanted = {}
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        url = data_url(scene(colour))
        r = ask(client, url, max_tokens=6, temperature=0)
        image = load_image(base64.b64decode(url.split(",", 1)[1]), model.vision_cfg.image_size)
        msgs = image_messages("What colour is the square?", True)
        want = answer(model, tok, msgs, [image], max_new_tokens=6)
        assert r.choices[0].message.content == want
        ids = model.image_tokens + len(tok.encode(msgs[0]["content"])) - len(tok.encode("<image>"))
        assert r.usage.prompt_tokens >= ids  # the image's slots count as prompt tokens
        wanted[name] = want
    blind = client.chat.completions.create(
        model="vlm", max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": "What colour is the square?"}],
    )  # fmt: skip
    assert blind.usage.prompt_tokens < r.usage.prompt_tokens


def test_the_playground_asks_a_served_vision_language_run(live, client):
    """`glassbox serve runs/vlm --playground`: the Images view lists the served run and
    answers with the same model as the API."""
    import httpx

    auth = {"Authorization": f"Bearer {KEY}"}
    info = httpx.get(live.url + "/v1/glassbox/info", headers=auth).json()
    assert info["vision"] == [{"id": "vlm", "image_size": 48}]
    url = data_url(scene((220, 30, 30)))
    body = {"run": "vlm", "question": "What colour is the square?", "image": url,
            "max_tokens": 4}  # fmt: skip
    r = httpx.post(live.url + "/v1/glassbox/vision", json=body, headers=auth, timeout=60)
    api = ask(client, url, max_tokens=4, temperature=0).choices[0].message.content
    assert r.status_code == 200 and r.json()["answer"] == api


def test_streaming_and_jpeg_images(client):
    url = data_url(scene((30, 200, 30)), "JPEG")
    full = ask(client, url, max_tokens=5, temperature=0).choices[0].message.content
    chunks = ask(client, url, max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full


def _bad_request(fn) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        fn()
    return info.value


@pytest.mark.parametrize(
    ("url", "param", "words"),
    [
        ("https://example.com/cat.png", "messages[0].content[0].image_url", "never fetches"),
        ("data:image/png;base64,%%%", "messages[0].content[0].image_url", "invalid base64"),
        ("data:image/png;base64," + base64.b64encode(b"\x89PNG truncated").decode(),
         "messages[0].content[0].image_url", "Cannot read image"),
        (data_url(Image.effect_noise((200, 200), 80).convert("RGB")),
         "messages[0].content[0].image_url", "at most 20000 bytes"),
        (data_url(Image.new("RGB", (400, 400))), "messages[0].content[0].image_url",
         "limit is 90000"),
    ],
)  # fmt: skip
def test_bad_images_are_400s_naming_the_field(client, url, param, words):
    err = _bad_request(lambda: ask(client, url, max_tokens=2))
    assert err.body["param"] == param and words in err.body["message"]


def test_image_count_part_type_and_text_model_are_checked(client):
    url = data_url(scene((200, 30, 30)))
    part = {"type": "image_url", "image_url": {"url": url}}
    three = [{"role": "user", "content": [part, part, part]}]
    err = _bad_request(lambda: client.chat.completions.create(model="vlm", messages=three))
    assert err.body["param"] == "messages" and "at most 2" in err.body["message"]
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    err = _bad_request(lambda: client.chat.completions.create(model="vlm", messages=audio))
    assert err.body["param"] == "messages[0].content[0].type"
    one = [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]
    err = _bad_request(lambda: client.chat.completions.create(model="lm", messages=one))
    assert err.body["param"] == "messages[0].content[0]" and "reads text only" in str(err)
    err = _bad_request(lambda: client.chat.completions.create(model="clip", messages=one))
    assert err.body["param"] == "model" and "/v1/embeddings" in err.body["message"]


def test_contrastive_embeddings_share_one_space(client, runs):
    model = load_checkpoint(runs["clip"]).model
    red = scene((220, 30, 30))
    texts = ["a red square", "a blue circle"]
    item = {"type": "image_url", "image_url": {"url": data_url(red)}}
    res = client.embeddings.create(model="clip", input=[*texts, item], encoding_format="float")
    got = np.array([d.embedding for d in res.data], dtype=np.float32)
    assert got.shape == (3, model.config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        want_t = model.encode_text(texts).numpy()
        pix = load_image(base64.b64decode(item["image_url"]["url"].split(",", 1)[1]), 48)
        want_i = model.encode_image(pix[None].float() / 127.5 - 1).numpy()
    np.testing.assert_allclose(got[:2], want_t, atol=1e-5)
    np.testing.assert_allclose(got[2:], want_i, atol=1e-5)
    b64 = client.embeddings.create(model="clip", input=texts)  # the client's base64 default
    np.testing.assert_allclose(np.array([d.embedding for d in b64.data]), want_t, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "inputs", "param", "words"),
    [
        ("clip", ["a zebra"], "input[0]", "never saw"),
        ("clip", [[3, 4]], "input", "token ids"),
        ("clip", [{"type": "text"}], "input[0]", "image_url"),
        ("clip", [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
         "input[0].image_url", "never fetches"),
        ("lm", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
         "input", "contrastive"),
    ],
)  # fmt: skip
def test_embedding_errors_name_the_field(client, model, inputs, param, words):
    err = _bad_request(lambda: client.embeddings.create(model=model, input=inputs))
    assert err.body["param"] == param and words in err.body["message"]


def test_glassbox_serve_cli_serves_both_runs(
    runs, free_port_number, glassbox_cli, tiny_clip_options, wait_healthy
):
    """`glassbox serve VLM CLIP` as the README shows it, in a subprocess."""

    port = free_port_number
    cmd = [glassbox_cli, "serve", f"vlm={runs['vlm']}", f"clip={runs['clip']}", "--port",
           str(port), "--device", "cpu", "--dtype", "fp32", "--max-images", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, proc)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        url = data_url(scene((220, 30, 30)))
        r = ask(client, url, max_tokens=3, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 10
        two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 2}]
        err = _bad_request(lambda: client.chat.completions.create(model="vlm", messages=two))
        assert "--max-images" in err.body["message"]
        emb = client.embeddings.create(model="clip", input="a red circle", encoding_format="float")
        assert len(emb.data[0].embedding) == tiny_clip_options["embed_dim"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
