"""The playground's API (/v1/glassbox/...) against a live server on the tiny model."""

from __future__ import annotations

import base64
import io
import json
import math
import threading

import httpx
import pytest
import torch

from glassbox.checkpoint import load_model_dir
from glassbox.data.preferences import load_pairs, tokenize_pairs
from glassbox.infer.explain import attention_maps
from glassbox.infer.sampling import filter_logits
from glassbox.serve import arena


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory, start_live, tiny_diffusion, tiny_vlm):
    """A key-protected server with the playground on, votes in a temporary directory."""
    from glassbox.serve.app import create_app, load_served_models

    arena_dir = tmp_path_factory.mktemp("arena")
    models = load_served_models([f"tiny={tiny_ckpt}"], device="cpu")
    app = create_app(models, api_key="test-key", playground=True, arena_dir=arena_dir,
                     diffusion={"shapes": tiny_diffusion}, vision={"scenes": tiny_vlm})  # fmt: skip
    srv = start_live(app)
    srv.arena_dir = arena_dir
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer test-key"},
                      timeout=60) as c:  # fmt: skip
        yield c


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    m, tok, _ = load_model_dir(tiny_ckpt, "cpu")
    return m, tok


def post(client, path, **body):
    return client.post("/v1/glassbox/" + path, json={"model": "tiny", **body})


# -- the page and its auth ------------------------------------------------------------


def test_page_is_open_api_needs_key(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    r = httpx.post(server.url + "/v1/glassbox/tokenize", json={"model": "tiny", "text": "hi"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/playground/../app.py").status_code in (401, 404)


def test_no_playground_no_page(make_server):
    srv = make_server()
    assert httpx.get(srv.url + "/").status_code == 404
    assert httpx.post(srv.url + "/v1/glassbox/tokenize", json={}).status_code == 404


# -- tokens ---------------------------------------------------------------------------


def test_tokenize_text_and_chat(client, model):
    _, tok = model
    r = post(client, "tokenize", text="hello world").json()
    assert [t["id"] for t in r["tokens"]] == tok.encode("hello world")
    assert "".join(t["text"] for t in r["tokens"]) == "hello world"
    msgs = [{"role": "user", "content": "hi"}]
    r = post(client, "tokenize", messages=msgs).json()
    assert [t["id"] for t in r["tokens"]] == tok.encode_chat(msgs)


def test_chat_context_drops_oldest_turns(client, model):
    _, tok = model  # context 128 tokens, reply reserve min(max_tokens, 64)
    long = "hello world " * 8
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"{i} {long}"}, {"role": "assistant", "content": long}]
    msgs.append({"role": "user", "content": "last"})
    r = post(client, "chat_context", messages=msgs, max_tokens=32).json()
    assert r["dropped"] > 0 and r["messages"][0]["role"] == "system"
    assert r["messages"][-1]["content"] == "last" and r["messages"][1]["role"] == "user"
    assert r["used"] == len(tok.encode_chat(r["messages"]))
    assert r["used"] + r["reserve"] <= 128 and r["left"] == 128 - r["used"]
    assert len(r["messages"]) == len(msgs) - r["dropped"]


# -- next-token explorer --------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 1.0},
        {"temperature": 0.7, "top_k": 5},
        {"temperature": 1.3, "top_p": 0.6},
        {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "min_p": 0.05},
    ],
)
def test_next_token_equals_log_softmax_under_filters(client, model, settings):
    m, tok = model
    r = post(client, "next_token", prompt="hello world, this", top_n=30, **settings).json()
    ids = [tok.eot_id, *tok.encode("hello world, this")]
    assert r["token_ids"] == ids
    with torch.no_grad():
        logits = m(torch.tensor([ids]))[0, -1, : tok.vocab_size].float()  # (V,)
    s = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0} | settings
    filtered = filter_logits(logits.view(1, -1), s["temperature"], s["top_k"], s["top_p"],
                             s["min_p"])[0]  # fmt: skip
    logp = filtered.log_softmax(-1)
    raw = logits.log_softmax(-1)
    assert r["survivors"] == int(torch.isfinite(filtered).sum())
    assert [c["id"] for c in r["candidates"]] == torch.topk(logits, 30).indices.tolist()
    for c in r["candidates"]:
        assert c["p_raw"] == pytest.approx(float(raw[c["id"]].exp()), abs=1e-5)
        assert c["p_final"] == pytest.approx(float(logp[c["id"]].exp()), abs=1e-5)
        assert c["kept"] == bool(torch.isfinite(filtered[c["id"]]))
    p = logp.exp()
    ent = float(-(p[p > 0] * logp[p > 0]).sum())
    assert r["entropy_final"] == pytest.approx(ent, abs=1e-4)
    assert torch.isfinite(filtered[r["chosen"]["id"]])  # the draw is from the survivors


def test_top_p_drops_the_tail_in_order(client):
    r = post(client, "next_token", prompt="The quick", top_n=50, top_p=0.5).json()
    kept = [c["kept"] for c in r["candidates"]]
    assert kept[0] and not all(kept)
    assert kept == sorted(kept, reverse=True)  # a prefix of the most likely survives
    assert {c["dropped_by"] for c in r["candidates"] if not c["kept"]} == {"top_p"}
    kept_p = [c["p_temperature"] for c in r["candidates"] if c["kept"]]
    assert sum(kept_p[:-1]) < 0.5 <= sum(kept_p) + 1e-6  # the smallest set reaching top_p


def test_temperature_changes_distribution_and_greedy(client):
    cold = post(client, "next_token", prompt="hello", temperature=0.2).json()
    hot = post(client, "next_token", prompt="hello", temperature=2.0).json()
    assert cold["entropy_final"] < hot["entropy_final"]
    greedy = post(client, "next_token", prompt="hello", temperature=0).json()
    assert greedy["chosen"]["id"] == greedy["candidates"][0]["id"]


def test_next_token_errors_name_the_param(client):
    for body, param in [
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_k": -3}, "top_k"),
        ({"prompt": "x", "top_n": 1000}, "top_n"),
        ({"token_ids": [10**6]}, "token_ids"),
        ({}, "prompt"),
        ({"prompt": "hello " * 200}, "prompt"),
    ]:
        r = post(client, "next_token", **body)
        assert r.status_code == 400, body
        assert r.json()["error"]["param"] == param, (body, r.json())
    r = client.post("/v1/glassbox/next_token", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# -- attention ------------------------------------------------------------------------


def test_attention_rows_sum_to_one_and_are_causal(client, model):
    m, _ = model
    r = post(client, "attention", prompt="hello world, this is").json()
    w = torch.tensor(r["weights"])  # (L, H, T, T)
    T = len(r["tokens"])
    assert w.shape == (m.cfg.n_layer, m.cfg.n_head, T, T)
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-3)
    assert float(w.triu(1).abs().max()) == 0.0


def test_attention_maps_reproduce_the_model(model):
    m, tok = model
    ids = [tok.eot_id, *tok.encode("The quick brown fox")]
    weights, hidden = attention_maps(m, ids)
    with torch.no_grad():
        expected = m.hidden(torch.tensor([ids]))[0]
    assert torch.allclose(hidden, expected, atol=1e-4)
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5)


def test_attention_limit_names_the_limit(client):
    r = post(client, "attention", token_ids=[5] * 300)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "token_ids"
    assert "127" in err["message"] or "256" in err["message"]


# -- arena ----------------------------------------------------------------------------


def vote(client, outcome, a="sft", b="ppo", text_a="yes", text_b="no", prompt="q?"):
    return client.post("/v1/glassbox/arena/vote", json={
        "prompt": [{"role": "user", "content": prompt}],
        "a": {"name": a, "content": text_a}, "b": {"name": b, "content": text_b},
        "outcome": outcome,
    })  # fmt: skip


def test_votes_land_in_preference_format_and_train(client, server, model):
    _, tok = model
    assert vote(client, "a", text_a="good answer", text_b="bad answer").status_code == 200
    assert vote(client, "b", a="ppo", b="sft", text_a="worse", text_b="better").status_code == 200
    assert vote(client, "tie").status_code == 200
    assert vote(client, "both_bad").status_code == 200
    prefs = server.arena_dir / arena.PREFERENCES
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "good answer"}]
    assert rows[0]["chosen_model"] == "sft" and rows[1]["chosen_model"] == "sft"
    assert rows[1]["chosen"][0]["content"] == "better"
    pairs = load_pairs(str(prefs))  # what `glassbox reward --data votes.jsonl` reads
    tokens, dropped = tokenize_pairs(tok, pairs, 128)
    assert len(tokens) >= 2 and dropped == 0
    ties = [json.loads(x) for x in (server.arena_dir / arena.TIES).read_text().splitlines()]
    assert [t["outcome"] for t in ties][-2:] == ["tie", "both_bad"]
    exported = client.get("/v1/glassbox/arena/votes").text
    assert exported == prefs.read_text()
    board = client.get("/v1/glassbox/arena/leaderboard", params={"rounds": 50}).json()
    assert board["votes"] >= 4 and board["players"][0]["name"] == "sft"


def test_concurrent_votes_are_not_lost(client, server):
    prefs = server.arena_dir / arena.PREFERENCES
    before = len(prefs.read_text().splitlines()) if prefs.exists() else 0
    big = "x" * 20_000  # lines longer than a pipe buffer still land whole
    errors = []

    def cast(i):
        try:
            r = vote(client, "a", a=f"m{i % 3}", b=f"m{(i + 1) % 3}", text_a=big + str(i))
            assert r.status_code == 200, r.text
        except Exception as e:  # noqa: BLE001  (collected and asserted below)
            errors.append(e)

    threads = [threading.Thread(target=cast, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    lines = prefs.read_text().splitlines()
    assert len(lines) == before + 40
    rows = [json.loads(line) for line in lines]  # every line is whole JSON
    assert sorted(int(r["chosen"][0]["content"][20_000:]) for r in rows[before:]) == list(range(40))


def test_vote_errors(client):
    r = vote(client, "maybe")
    assert r.status_code == 400 and r.json()["error"]["param"] == "outcome"
    r = vote(client, "a", a="same", b="same")
    assert r.status_code == 400 and r.json()["error"]["param"] == "b.name"


def test_bradley_terry_and_elo_by_hand():
    games = [arena.Game("A", "B", 1.0, i) for i in range(3)] + [arena.Game("A", "B", 0.0, 3)]
    bt = arena.bradley_terry(games, ["A", "B"], prior=0.0)
    assert bt[0] - bt[1] == pytest.approx(400 * math.log10(3), abs=1e-6)  # p_A / p_B = 3
    assert bt.mean() == pytest.approx(1000)
    # three players, maximum likelihood: each player's expected wins equal actual wins
    games = [arena.Game("A", "B", 1.0, 0), arena.Game("B", "C", 1.0, 1),
             arena.Game("C", "A", 1.0, 2), arena.Game("A", "C", 1.0, 3),
             arena.Game("A", "B", 0.5, 4), arena.Game("B", "C", 0.0, 5)]  # fmt: skip
    players = ["A", "B", "C"]
    s = arena.bradley_terry(games, players, prior=0.0)
    p = 10 ** (s / 400)
    wins, n = arena._tables(*arena._encode(games, players), 3)
    expected = [(n[i] * p[i] / (p[i] + p)).sum() for i in range(3)]
    assert expected == pytest.approx(list(wins), abs=1e-6)
    # Elo by hand: equal ratings, A wins: A gains K/2
    r = arena.elo([arena.Game("A", "B", 1.0, 0)], ["A", "B"])
    assert list(r) == [1016.0, 984.0]
    board = arena.leaderboard(games, rounds=100)
    top = board["players"][0]
    assert top["name"] == "A" and top["bt_ci"][0] <= top["bt"] <= top["bt_ci"][1]
    assert top["wins"] == 2 and top["ties"] == 1 and top["losses"] == 1


# -- vision-language ------------------------------------------------------------------


def png_data_url(size=(40, 30), color=(200, 30, 30)) -> tuple[str, bytes]:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), buf.getvalue()


def test_vision_answers_as_the_model_does(client, tiny_vlm):
    from glassbox.vision.scenes import load_image
    from glassbox.vision.vlm import IMAGE_MARKER, answer

    url, raw = png_data_url()
    body = {"run": "scenes", "question": "How many shapes?", "image": url, "max_tokens": 8}
    r = client.post("/v1/glassbox/vision", json=body).json()
    pixels = [load_image(raw, 16)]
    msgs = [{"role": "user", "content": f"{IMAGE_MARKER}\nHow many shapes?"}]
    assert r["answer"] == answer(tiny_vlm.model, tiny_vlm.tokenizer, msgs, pixels, 8)
    assert r["image_tokens"] == 5 and r["image_size"] == 16
    blind = client.post("/v1/glassbox/vision", json={**body, "image": None}).json()
    assert blind["image_tokens"] == 0 and blind["prompt_tokens"] < r["prompt_tokens"]
    info = client.get("/v1/glassbox/info").json()
    assert info["vision"] == [{"id": "scenes", "image_size": 16}]


def test_vision_errors_name_the_param(client):
    url, _ = png_data_url()
    not_png = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    for body, param in [
        ({"image": "http://example.com/x.png"}, "image"),
        ({"image": "data:image/png;base64,@@@"}, "image"),
        ({"image": not_png}, "image"),
        ({"image": url, "question": " "}, "question"),
        ({"image": None, "question": "<image>\nwhat?"}, "question"),
        ({"image": url, "max_tokens": 0}, "max_tokens"),
        ({"image": url, "run": "nope"}, "run"),
    ]:
        r = client.post("/v1/glassbox/vision", json={"run": "scenes", "question": "what?", **body})
        assert r.status_code in (400, 404), body
        assert r.json()["error"]["param"] == param, (body, r.json())


# -- diffusion ------------------------------------------------------------------------


def test_diffusion_trajectory_frames(client):
    info = client.get("/v1/glassbox/info").json()
    assert info["diffusion"] == [{"id": "shapes", "condition": "classes: red, green, blue"}]
    body = {"run": "shapes", "prompt": "green", "steps": 6, "guidance": 2.0, "seed": 1}
    r = client.post("/v1/glassbox/diffusion", json=body).json()
    frames = r["frames"]
    assert len(frames) == 7 and frames[-1]["t"] == -1  # every step, then the final image
    ts = [f["t"] for f in frames[:-1]]
    assert ts == sorted(ts, reverse=True)  # noise first
    for f in frames:
        for key in ("x_t", "x0"):
            assert f[key].startswith("data:image/png;base64,")
            png = base64.b64decode(f[key].split(",", 1)[1])
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
    again = client.post("/v1/glassbox/diffusion", json=body).json()
    assert again["frames"][-1] == frames[-1]  # seeded: the same image


def test_diffusion_errors(client):
    for body, param in [
        ({"run": "shapes", "prompt": "purple"}, "prompt"),
        ({"run": "shapes", "prompt": 0, "steps": 0}, "steps"),
        ({"run": "shapes", "prompt": 0, "guidance": 99}, "guidance"),
        ({"run": "nope", "prompt": 0}, "run"),
    ]:
        r = client.post("/v1/glassbox/diffusion", json=body)
        assert r.status_code in (400, 404), body
        assert r.json()["error"]["param"] == param, (body, r.json())


def test_reward_model_trains_on_arena_votes(client, server, tiny_ckpt, tmp_path):
    """The loop closed: votes cast through the API train `glassbox reward` as they are."""
    from glassbox.train.reward import RewardConfig, train_reward

    for i in range(6):
        vote(client, "a" if i % 2 else "b", text_a=f"answer {i}", text_b=f"other {i}")
    votes = server.arena_dir / arena.PREFERENCES
    cfg = RewardConfig(base=str(tiny_ckpt), out=str(tmp_path / "rm"), data=str(votes),
                       batch_size=4, max_steps=3, eval_interval=3, log_interval=1,
                       warmup_steps=1)  # fmt: skip
    last = train_reward(cfg)
    assert (tmp_path / "rm" / "model.safetensors").is_file()
    assert 0.0 <= last["val_accuracy"] <= 1.0 and math.isfinite(last["train_loss"])


@pytest.mark.slow
def test_cli_serves_the_playground(tiny_ckpt, tmp_path, free_port_number, wait_until):
    """`glassbox serve CKPT --playground --arena-dir DIR`: the page, the API, votes on disk;
    --diffusion without --playground is refused with a message and no traceback."""
    import subprocess
    import sys

    base = f"http://127.0.0.1:{free_port_number}"
    serve = [sys.executable, "-m", "glassbox.cli", "serve", str(tiny_ckpt)]
    cmd = [*serve, "--port", str(free_port_number), "--playground", "--arena-dir",
           str(tmp_path / "votes")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def up() -> bool:
        try:
            return httpx.get(base + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(up, timeout=60)
        assert "Glassbox playground" in httpx.get(base + "/").text
        assert httpx.get(base + "/playground/explorer.js").status_code == 200
        r = httpx.post(base + "/v1/glassbox/arena/vote", json={
            "prompt": [{"role": "user", "content": "q"}], "a": {"name": "x", "content": "1"},
            "b": {"name": "y", "content": "2"}, "outcome": "b"})  # fmt: skip
        assert r.status_code == 200
        assert json.loads((tmp_path / "votes" / "votes.jsonl").read_text())["chosen_model"] == "y"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"playground: http://127.0.0.1:{free_port_number}/" in out
    bad = subprocess.run([*serve, "--diffusion", "runs/x"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "add --playground" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr


def test_vlm_flag_refuses_a_language_model(tiny_ckpt):
    from glassbox.errors import GlassboxError
    from glassbox.serve.endpoints.playground_vision import load_vision_runs

    with pytest.raises(GlassboxError, match="not a vision-language model"):
        load_vision_runs([str(tiny_ckpt)], "cpu")
