"""The vision-language model: the embeds hook, splicing, image dependence, train, ask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from glassbox import checkpoint as ckpt
from glassbox.cli import app
from glassbox.errors import GlassboxError
from glassbox.vision.scenes import make_scenes
from glassbox.vision.vlm import (
    IMAGE_MARKER,
    flatten_content_parts,
    generate,
    image_messages,
    prompt_ids,
    splice_ids,
    training_example,
)


def test_embeds_hook_leaves_ids_path_unchanged(tiny_model):
    ids = torch.randint(0, tiny_model.cfg.vocab_size, (2, 9))
    plain = tiny_model(ids)
    same = tiny_model(ids, embeds=tiny_model.embed(ids))
    assert torch.equal(plain, same)
    other = tiny_model(ids, embeds=tiny_model.embed(ids) + 1.0)
    assert not torch.allclose(plain, other)


@pytest.fixture(scope="module")
def vlm(vlm_run):
    loaded = ckpt.load_checkpoint(vlm_run)
    assert loaded.architecture == "vlm"
    return loaded.model, loaded.tokenizer


def test_placeholder_splices_image_tokens(vlm):
    model, tok = vlm
    n = model.image_tokens
    assert n == (48 // 8 // 2) ** 2  # 3x3 pooled cells; no [CLS] token by default
    msgs = [{"role": "user", "content": f"{IMAGE_MARKER}\nfirst {IMAGE_MARKER}\nsecond"}]
    from glassbox.conversation import encode_prompt

    plain = encode_prompt(tok, msgs)
    ids, starts = prompt_ids(tok, msgs, 2, n)
    assert len(starts) == 2 and starts[1] > starts[0] + n
    assert len(ids) == len(plain) - 2 * len(tok.encode(IMAGE_MARKER)) + 2 * n
    assert all(ids[s + k] == tok.pad_id for s in starts for k in range(n))
    with pytest.raises(GlassboxError, match="2 image placeholders"):
        splice_ids(tok, plain, 1, n)
    ids, mask, starts = training_example(tok, "What colour?", "red", True, n)
    assert len(ids) == len(mask) and sum(mask[starts[0] : starts[0] + n]) == 0
    learned = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert learned.startswith("red")


def test_forward_with_image_differs_from_without(vlm):
    model, tok = vlm
    data = make_scenes(2, "heldout")
    with_img = prompt_ids(tok, image_messages("How many shapes are there?", True), 1,
                          model.image_tokens)  # fmt: skip
    ids = torch.tensor([with_img[0]])
    slots = torch.tensor([[0, with_img[1][0]]])
    with torch.no_grad():
        a = model(ids, data.floats(slice(0, 1)), slots)
        b = model(ids)  # the same ids, image slots left as plain pad embeddings
        c = model(ids, data.floats(slice(1, 2)), slots)
    assert not torch.allclose(a[0, -1], b[0, -1]) and not torch.allclose(a[0, -1], c[0, -1])
    # Batched greedy decoding of unequal prompts equals decoding each alone.
    blind = prompt_ids(tok, image_messages("Is there a red cross?", False), 0, model.image_tokens)
    imgs = [data.images[:1], None]
    both = generate(model, tok, [with_img, blind], imgs, max_new_tokens=4)
    alone = [generate(model, tok, [p], [im], max_new_tokens=4)[0]
             for p, im in zip([with_img, blind], imgs, strict=True)]  # fmt: skip
    assert both == alone


def test_content_parts_become_markers():
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "What is this?"},
    ]}]  # fmt: skip
    flat, images = flatten_content_parts(msgs)
    assert flat[0]["content"] == f"{IMAGE_MARKER}\nWhat is this?"
    assert images[0][0] == "messages[0].content[0].image_url"
    with pytest.raises(GlassboxError, match="content\\[0\\].type='audio'"):
        flatten_content_parts([{"role": "user", "content": [{"type": "audio"}]}])


def test_vlm_ask_cli(vlm_run, tmp_path):
    img = tmp_path / "scene.png"
    Image.fromarray(np.asarray(make_scenes(1, "heldout").images[0].permute(1, 2, 0))).save(img)
    args = ["vlm", "ask", vlm_run, "--image", str(img), "How many shapes?", "--max-tokens", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "time to first token" in result.output
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    result = CliRunner().invoke(app, ["vlm", "ask", vlm_run, "--image", str(bad), "Hi?"])
    assert result.exit_code != 0 and "bad.png" in str(result.exception)


def test_vlm_train_refuses_wrong_vision(lm_run, tmp_path):
    result = CliRunner().invoke(app, ["vlm", "train", lm_run, "--vision", lm_run, "--out",
                                      str(tmp_path / "v")])  # fmt: skip
    assert result.exit_code != 0 and "glassbox clip train" in str(result.exception)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {  # the ViT in its own optimizer, question-first prompts, resampled scenes
            "freeze_vision": False, "vision_lr_ratio": 0.1, "question_first_fraction": 0.5,
            "single_object_fraction": 0.2, "loss_average": "example", "positions": True,
        },
    ],
)  # fmt: skip
def test_vlm_resume_is_exact(lm_run, clip_run, tmp_path, options, resumed_weights):
    from glassbox.vision.train import VLMTrainConfig, train_vlm

    settings = dict(base=lm_run, vision=clip_run, num_images=64, batch_size=4, max_steps=4)
    settings |= options
    settings |= dict(eval_interval=10, checkpoint_interval=2, log_interval=2, eval_limit=2)
    settings["device"] = "cpu"
    a = resumed_weights(train_vlm, VLMTrainConfig, tmp_path, settings)
    if not options.get("freeze_vision", True):  # the ViT learned, at a tenth of the lr
        vit = ckpt.load_tensors(clip_run + "/model.safetensors")
        moved = [k for k in a if k.startswith("vision.") and not torch.equal(a[k], vit[k])]
        assert moved


def test_stem_states_are_local_and_blocks_mix_them():
    from glassbox.vision.clip import ClipConfig, ViT

    torch.manual_seed(0)
    vit = ViT(ClipConfig(vision_dim=32, vision_layers=1, text_dim=32, embed_dim=16)).eval()
    x = make_scenes(1, "heldout").floats()
    y = x.clone()
    y[..., 17:21, 17:21] = 1.0  # pixels only patch (2, 2)'s stem sees (index 1 + 2*6 + 2)
    with torch.no_grad():
        moved = (vit.embed(x) - vit.embed(y)).abs().amax(-1)[0]  # (1 + 36,)
        mixed = (vit(x) - vit(y)).abs().amax(-1)[0]
    assert moved.nonzero().flatten().tolist() == [15]
    assert (mixed > 0).sum() > 1  # attention spreads the change


@pytest.mark.parametrize(
    ("features", "cls_token", "positions"),
    [("last", True, False), ("stem+last", True, True), ("stem", False, False)],
)
def test_feature_options_round_trip(lm_run, clip_run, tmp_path, features, cls_token, positions):
    import json

    from glassbox.vision.train import VLMTrainConfig, train_vlm

    out = tmp_path / "run"
    train_vlm(VLMTrainConfig(
        base=lm_run, vision=clip_run, out=str(out), num_images=64, batch_size=4, max_steps=1,
        eval_interval=1, eval_limit=1, device="cpu", features=features, cls_token=cls_token,
        positions=positions,
    ))  # fmt: skip
    model = ckpt.load_checkpoint(out).model
    assert (model.features, model.cls_token, model.positions) == (features, cls_token, positions)
    assert model.image_tokens == int(cls_token) + 9
    x = make_scenes(2, "heldout").floats()
    assert model.encode_images(x).shape == (2, model.image_tokens, model.lm.cfg.d_model)
    if features == "last":  # a run from before these options loads as what it was
        record = json.loads((out / "config.json").read_text())
        del record["features"], record["cls_token"], record["positions"]
        (out / "config.json").write_text(json.dumps(record))
        old = ckpt.load_checkpoint(out).model
        assert (old.features, old.cls_token, old.positions, old.image_tokens) == (
            "last", True, False, 10,
        )  # fmt: skip
        assert torch.equal(old.encode_images(x), model.encode_images(x))


def test_answer_loss_token_and_example_averages():
    from glassbox.vision.train import answer_loss

    logits = torch.randn(2, 4, 5)
    targets = torch.tensor([[1, -100, -100, -100], [2, 3, 4, -100]])
    per = -torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    a, b = per[0, 0], per[1, :3]
    token = answer_loss(logits, targets, "token")
    example = answer_loss(logits, targets, "example")
    assert token.item() == pytest.approx(((a + b.sum()) / 4).item(), rel=1e-6)
    assert example.item() == pytest.approx(((a + b.mean()) / 2).item(), rel=1e-6)


def test_scene_sampler_and_question_first_prompts():
    import random

    from glassbox.vision.train import scene_sampler

    data = make_scenes(200, "train")
    rng = random.Random(0)
    only_multi = {len(data.scenes[scene_sampler(data, 0.0)(rng)].objects) for _ in range(100)}
    only_single = {len(data.scenes[scene_sampler(data, 1.0)(rng)].objects) for _ in range(100)}
    assert 1 not in only_multi and only_single == {1}
    msgs = image_messages("What colour is the square?", True, "red", image_first=False)
    assert msgs[0]["content"] == f"What colour is the square?\n{IMAGE_MARKER}"


def test_positions_add_a_vector_per_place(vlm):
    from glassbox.vision.vlm import VisionLanguageModel

    model, _ = vlm
    torch.manual_seed(0)
    with_pos = VisionLanguageModel(model.lm, model.vision_cfg, positions=True).eval()
    with_pos.vision.load_state_dict(model.vision.state_dict())
    plain = VisionLanguageModel(model.lm, model.vision_cfg).eval()
    plain.vision.load_state_dict(model.vision.state_dict())
    plain.projector.load_state_dict(with_pos.projector.state_dict())
    x = make_scenes(1, "heldout").floats()
    with torch.no_grad():
        diff = with_pos.encode_images(x) - plain.encode_images(x)  # (1, 10, d)
    rows, cols = with_pos.image_rows, with_pos.image_cols
    assert torch.allclose(diff[0, 0], with_pos.image_cls)
    assert torch.allclose(diff[0, 1 + 1 * 3 + 2], rows[1] + cols[2])  # row 1, column 2
