"""Images in chat requests: data URLs decode; remote, oversized, corrupt, too many -> 400."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from glassbox.serve.errors import APIError
from glassbox.serve.limits import ServeLimits
from glassbox.vision.api import request_images
from glassbox.vision.vlm import IMAGE_MARKER


def _url(img: Image.Image | bytes) -> str:
    if isinstance(img, Image.Image):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        img = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(img).decode()


def _msgs(*urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]}]


def test_data_url_image_decodes():
    flat, images = request_images(_msgs(_url(Image.new("RGB", (64, 32), (255, 0, 0)))),
                                  ServeLimits())  # fmt: skip
    assert flat[0]["content"] == f"{IMAGE_MARKER}\nWhat is it?"
    assert images[0].shape == (3, 48, 48) and images[0][0].min() == 255


@pytest.mark.parametrize(
    ("url", "limits", "match"),
    [
        ("https://example.com/cat.png", ServeLimits(), "never fetches"),
        ("data:text/plain;base64,aGk=", ServeLimits(), "data:image/png;base64"),
        ("data:image/png;base64,@@@", ServeLimits(), "invalid base64"),
        (_url(b"\x89PNG not really"), ServeLimits(), "Cannot read image"),
        (_url(Image.new("RGB", (200, 200))), ServeLimits(max_image_bytes=100), "at most 100 bytes"),
        (_url(Image.new("RGB", (200, 200))), ServeLimits(max_image_pixels=1000), "limit is 1000"),
    ],
)
def test_bad_images_are_400s_naming_the_field(url, limits, match):
    with pytest.raises(APIError, match=match) as e:
        request_images(_msgs(url), limits)
    assert e.value.status == 400 and e.value.param == "messages[0].content[0].image_url"


def test_too_many_images():
    url = _url(Image.new("RGB", (8, 8)))
    with pytest.raises(APIError, match="3 images; this server allows at most 2") as e:
        request_images(_msgs(url, url, url), ServeLimits(max_images=2))
    assert e.value.param == "messages"


def test_chat_prompt_vectors_carry_the_image(vlm_run):
    import torch

    from glassbox import checkpoint as ckpt
    from glassbox.vision.api import chat_prompt

    loaded = ckpt.load_checkpoint(vlm_run)
    model, tok = loaded.model, loaded.tokenizer
    red, blue = Image.new("RGB", (48, 48), (230, 40, 40)), Image.new("RGB", (48, 48), (50, 90, 240))
    ids_r, emb_r = chat_prompt(model, tok, _msgs(_url(red)), ServeLimits())
    ids_b, emb_b = chat_prompt(model, tok, _msgs(_url(blue)), ServeLimits())
    assert ids_r == ids_b and emb_r.shape == (len(ids_r), model.lm.cfg.d_model)
    text = torch.tensor([ids_r])
    same = (emb_r == model.lm.embed(text)[0]).all(-1)  # (T,) rows equal to token embeddings
    assert int((~same).sum()) == model.image_tokens  # exactly the image slots differ
    assert not torch.equal(emb_r, emb_b)
    ids, emb = chat_prompt(model, tok, [{"role": "user", "content": "Hi"}], ServeLimits())
    assert emb is None and ids
