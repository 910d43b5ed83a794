"""The playground page in a real Chromium (Playwright), against a live key-protected
server on two tiny models. Skipped when no chromium binary is installed (CI installs
Debian's: see .ci/run). GLASSBOX_SCREENSHOTS=docs/img saves the screenshots the docs use.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "no chromium binary on PATH: the playground's browser tests need one "
        "(apt-get install chromium; Playwright's own browser downloads are not used)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

KEY = "test-key"
SHOTS = os.environ.get("GLASSBOX_SCREENSHOTS")


def shot(page, name: str) -> None:
    """Save a screenshot for docs/playground.md when GLASSBOX_SCREENSHOTS is set."""
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"playground-{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory, start_live, tiny_diffusion, tiny_vlm):
    from glassbox.serve.app import create_app, load_served_models

    arena_dir = tmp_path_factory.mktemp("arena")
    models = load_served_models([f"tiny={tiny_ckpt}", f"tiny2={tiny_ckpt}"], device="cpu")
    app = create_app(models, api_key=KEY, playground=True, arena_dir=arena_dir,
                     diffusion={"shapes": tiny_diffusion}, vision={"scenes": tiny_vlm})  # fmt: skip
    srv = start_live(app)
    srv.arena_dir = arena_dir
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """The page, opened and given the right key."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    requests: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("request", lambda r: requests.append(r.url))
    pg.goto(server.url + "/")
    pg.fill("#api-key", KEY)
    pg.click("#key-form button[type=submit]")
    expect(pg.locator("#status")).to_contain_text("Connected: tiny, tiny2")
    yield pg
    context.close()
    assert not errors, errors
    # No hidden network calls: everything the page fetched is from this server (or data:).
    foreign = [u for u in requests if not u.startswith((server.url + "/", "data:", "blob:"))]
    assert not foreign, foreign


def api(server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)  # fmt: skip
    r.raise_for_status()
    return r.json()


def test_wrong_key_shows_error_banner(browser, server):
    pg = browser.new_page()
    pg.goto(server.url + "/")
    banner = pg.locator("#banner")
    expect(banner).to_be_visible()  # no key yet: the first API call is refused
    pg.fill("#api-key", "wrong-key")
    pg.keyboard.press("Enter")
    expect(banner).to_contain_text("Error 401")
    expect(banner).to_contain_text("invalid API key")
    shot(pg, "error")
    pg.fill("#api-key", KEY)
    pg.keyboard.press("Enter")
    expect(pg.locator("#status")).to_contain_text("Connected")
    expect(banner).to_be_hidden()
    pg.close()


def test_chat_streams_text(page, server):
    # A seed whose greedy-free reply is long enough to arrive in several pieces.
    msgs = [{"role": "user", "content": "hello"}]
    seed = next(s for s in range(50) if api(server, "/v1/chat/completions", {
        "model": "tiny", "messages": msgs, "max_tokens": 24, "seed": s, "temperature": 0.7,
        "top_p": 0.95})["usage"]["completion_tokens"] >= 12)  # fmt: skip
    engine = server.app.state.models["tiny"].engine.engine
    step = engine.step
    engine.step = lambda: (time.sleep(0.1), step())[1]  # slow enough to see it stream
    try:
        page.fill("#chat-max_tokens", "24")
        page.fill("#chat-seed", str(seed))
        page.fill("#chat-input", "hello")
        page.keyboard.press("Control+Enter")
        reply = page.locator("#chat-log .msg.assistant .content")
        expect(page.locator("#chat-stop")).to_be_enabled()
        expect(reply).not_to_have_text("")
        partial = reply.inner_text()
        assert page.locator("#chat-stop").is_enabled(), "the reply finished before it was seen"
        expect(page.locator("#chat-speed")).to_contain_text("tokens/s", timeout=30_000)
    finally:
        del engine.step
    final = reply.inner_text()
    assert len(final) > len(partial) and final.startswith(partial)
    expect(page.locator("#chat-meter-text")).to_contain_text("tokens used")
    used = int(page.locator("#chat-meter-text").inner_text().split()[0])
    assert used > 0
    shot(page, "chat")


def test_chat_renders_structured_output(page):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}  # fmt: skip
    page.select_option("#chat-format", "json_schema")
    expect(page.locator("#chat-schema")).to_be_visible()
    page.fill("#chat-schema", json.dumps(schema))
    page.fill("#chat-input", "yes or no?")
    page.click("#chat-send")
    reply = page.locator("#chat-log .msg.assistant .content")
    expect(reply.locator(".badge")).to_have_text("valid JSON", timeout=30_000)
    assert json.loads(reply.locator("pre.json").inner_text())["answer"] in ("yes", "no")
    page.fill("#chat-schema", "{not json")
    page.fill("#chat-input", "again")
    page.click("#chat-send")
    expect(page.locator("#banner")).to_contain_text("not valid JSON")


def test_chat_stop_cancels_the_generation(page, server, wait_until):
    engine = server.app.state.models["tiny"].engine
    step = engine.engine.step
    engine.engine.step = lambda: (time.sleep(0.2), step())[1]
    try:
        page.fill("#chat-max_tokens", "60")
        page.fill("#chat-logit-bias", ", ".join(f"{i}:-100" for i in range(6)))  # no end token
        page.fill("#chat-input", "hello")
        page.click("#chat-send")
        expect(page.locator("#chat-log .msg.assistant .content")).not_to_have_text("")
        page.click("#chat-stop")
        expect(page.locator("#chat-send")).to_be_enabled()
        # The server saw the disconnect and freed the sequence long before 60 tokens.
        assert wait_until(lambda: engine.num_running == 0 and engine.num_waiting == 0, 5)
    finally:
        del engine.engine.step


def test_temperature_slider_changes_distribution(page, server):
    page.click("#tab-explorer")
    rows = page.locator("#ex-table tbody tr")
    expect(rows.first).to_be_visible()
    before = rows.first.get_attribute("data-p-temperature")
    page.locator("#ex-temperature").focus()
    page.keyboard.press("Home")  # keyboard: temperature 0 -> the top token takes all
    expect(page.locator("#ex-temperature-out")).to_have_text("0")
    expect(rows.first).not_to_have_attribute("data-p-temperature", before)
    assert float(rows.first.get_attribute("data-p-temperature")) == pytest.approx(1.0, abs=1e-3)
    page.locator("#ex-temperature").fill("2")
    expect(rows.first).not_to_have_attribute("data-p-temperature", "1")
    hot = float(rows.first.get_attribute("data-p-temperature"))
    assert hot < float(before)  # hotter: the top token loses mass
    shot(page, "explorer")


def test_top_p_hides_the_right_tokens(page, server):
    page.click("#tab-explorer")
    rows = page.locator("#ex-table tbody tr")
    expect(rows.first).to_be_visible()
    page.locator("#ex-top_p").fill("0.3")
    expect(page.locator("#ex-table tr.dropped").first).to_be_attached()
    shown = {
        int(r.get_attribute("data-token-id")): r.get_attribute("data-kept") == "true"
        for r in rows.all()
    }
    expected = api(server, "/v1/glassbox/next_token", {
        "model": "tiny", "prompt": page.input_value("#ex-prompt"), "top_p": 0.3})  # fmt: skip
    assert shown == {c["id"]: c["kept"] for c in expected["candidates"]}
    assert not all(shown.values()) and any(shown.values())
    # Branching: clicking a dropped candidate still appends it (the user's choice).
    dropped = page.locator("#ex-table tr.dropped").first
    token = dropped.get_attribute("data-token-id")
    dropped.click()
    expect(page.locator("#ex-text .chip.gen")).to_have_count(1)
    assert page.locator("#ex-text .chip.gen").get_attribute("title") == f"token {token}"


def test_attention_view_renders(page, server):
    page.click("#tab-attention")
    page.fill("#at-prompt", "hello world, this is")
    page.click("#at-show")
    expected = api(
        server, "/v1/glassbox/tokenize", {"model": "tiny", "text": "hello world, this is"}
    )
    chips = page.locator("#at-tokens .chip")
    expect(chips).to_have_count(expected["count"] + 1)  # + the <|endoftext|> that starts it
    canvas = page.locator("#at-heatmap")
    assert canvas.get_attribute("data-tokens") == str(expected["count"] + 1)
    assert int(page.locator("#at-lines").get_attribute("data-lines")) > 0
    inked = page.evaluate("""() => {
        const c = document.getElementById('at-heatmap');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 200) n++; return n; }""")
    assert inked > 0
    chips.nth(3).focus()  # a query picked by keyboard draws only its lines
    assert int(page.locator("#at-lines").get_attribute("data-lines")) <= 4
    shot(page, "attention")


def test_arena_vote_lands_and_changes_leaderboard(page, server):
    prefs = server.arena_dir / "votes.jsonl"
    before = len(prefs.read_text().splitlines()) if prefs.exists() else 0
    page.click("#tab-arena")
    page.fill("#ar-max", "12")
    page.fill("#ar-prompt", "Say hi")
    page.click("#ar-ask")
    vote_a = page.locator("#ar-vote-a")
    expect(vote_a).to_be_enabled(timeout=30_000)
    text_a = page.inner_text("#ar-a")
    vote_a.click()
    expect(page.locator("#ar-reveal")).to_contain_text("A was")
    lines = prefs.read_text().splitlines()
    assert len(lines) == before + 1
    row = json.loads(lines[-1])
    assert row["prompt"] == [{"role": "user", "content": "Say hi"}]
    assert row["chosen"][0]["content"].strip() == text_a.strip()
    winner = row["chosen_model"]
    assert page.inner_text("#ar-reveal").startswith(f"Recorded. A was {winner}")
    board = page.locator(f'#ar-board tbody tr[data-name="{winner}"]')
    expect(board).to_have_attribute("data-games", str(before + 1))
    expect(page.locator("#ar-votes")).to_have_text(str(before + 1))
    shot(page, "arena")
    with page.expect_download() as download:
        page.click("#ar-export")
    assert Path(download.value.path()).read_text() == prefs.read_text()
    assert download.value.suggested_filename == "votes.jsonl"


def test_images_play_the_denoising_trajectory(page):
    page.click("#tab-images")
    expect(page.locator("#img-ui")).to_be_visible()
    page.fill("#img-prompt", "blue")
    page.fill("#img-steps", "8")
    page.click("#img-go")
    expect(page.locator("#img-frame")).to_have_attribute("max", "8")
    expect(page.locator("#img-frame-out")).to_have_text("final image")
    assert page.get_attribute("#img-x0", "src").startswith("data:image/png;base64,")
    page.locator("#img-frame").fill("0")
    expect(page.locator("#img-frame-out")).to_contain_text("step 1 of 8")
    shot(page, "images")


def test_readable_at_200_percent_zoom(browser, server):
    """200% zoom of a 1280-px window is a 640-CSS-px viewport: no view scrolls sideways."""
    context = browser.new_context(viewport={"width": 640, "height": 450}, device_scale_factor=2)
    pg = context.new_page()
    pg.goto(server.url + "/")
    pg.fill("#api-key", KEY)
    pg.keyboard.press("Enter")
    expect(pg.locator("#status")).to_contain_text("Connected")
    tabs = pg.locator('[role="tab"]')
    for i in range(tabs.count()):
        tabs.nth(i).click()
        overflow = pg.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, (tabs.nth(i).inner_text(), overflow)
    tabs.first.focus()  # the tabs move with the arrow keys
    pg.keyboard.press("ArrowRight")
    expect(pg.locator("#tab-explorer")).to_be_focused()
    expect(pg.locator("#panel-explorer")).to_be_visible()
    shot(pg, "zoom200")
    context.close()


def test_images_ask_a_vision_language_model(page, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (20, 160, 40)).save(tmp_path / "green.png")
    page.click("#tab-images")
    expect(page.locator("#vlm-ui")).to_be_visible()
    page.set_input_files("#vlm-file", str(tmp_path / "green.png"))
    expect(page.locator("#vlm-preview")).to_be_visible()
    page.fill("#vlm-question", "What colour is it?")
    page.click("#vlm-ask")
    expect(page.locator("#vlm-meta")).to_contain_text("5 of them the image", timeout=30_000)
    shot(page, "vision")
