"""The arena: blind pairwise votes, written where `glassbox reward` can train on them,
and a leaderboard (Bradley-Terry and Elo, with bootstrap confidence intervals).

Files under the arena directory (``glassbox serve --arena-dir``, default runs/arena):

- ``votes.jsonl``: the decisive votes (A or B better), one preference pair per line in
  TRL's conversational form, which :mod:`glassbox.data.preferences` reads as is::

      {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant",
       "content": ...}], "rejected": [...], "chosen_model": "sft", "rejected_model": "ppo",
       "outcome": "a", "shown": ["sft", "ppo"], "id": "...", "time": 1765000000.0}

- ``ties.jsonl``: "tie" and "both bad" votes (no preferred answer, nothing to train a
  reward model on), with both responses kept: ``{"prompt", "responses": [{"model",
  "content"}, ...], "outcome": "tie" | "both_bad", ...}``.

Each vote is one line written with one ``os.write`` to a file opened with O_APPEND, under
a process-wide lock, then fsynced before the vote is acknowledged: concurrent votes never
interleave or get lost. (A power cut in the middle of a write could still leave a partial
last line; the reader then names that line.)

Leaderboard: a tie and a both-bad vote count as half a win to each side (as in Chatbot
Arena). Bradley-Terry strengths are fitted by Hunter's MM algorithm, with ``prior``
virtual ties of every contestant against a fixed anchor so that a contestant that never
won still gets a finite score; scores are shown on the Elo scale (400 log10, mean 1000).
Elo is the online rating (K=32, start 1000) over the votes in the order cast. Both get
95% intervals from ``rounds`` bootstrap resamples of the votes (seeded).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glassbox.data.jsonl import read_jsonl

OUTCOMES = ("a", "b", "tie", "both_bad")
PREFERENCES = "votes.jsonl"
TIES = "ties.jsonl"

_LOCK = threading.Lock()  # one writer at a time per process; O_APPEND covers processes


def append_line(path: Path, record: dict) -> None:
    """Append ``record`` as one JSON line: one write to an O_APPEND fd, then fsync."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):  # a full disk: say so rather than leave half a line
                raise OSError(f"wrote {written} of {len(line)} bytes to {path}")
            os.fsync(fd)
        finally:
            os.close(fd)


def vote_record(
    prompt: list[dict[str, str]],
    shown: list[tuple[str, str]],  # [(contestant A, response A), (contestant B, response B)]
    outcome: str,
) -> tuple[str, dict]:
    """(file name, record) for one vote; see the module docstring for the two forms."""
    (name_a, text_a), (name_b, text_b) = shown
    meta = {"outcome": outcome, "shown": [name_a, name_b], "id": uuid.uuid4().hex,
            "time": time.time()}  # fmt: skip
    if outcome in ("a", "b"):
        win, lose = ((name_a, text_a), (name_b, text_b))[:: 1 if outcome == "a" else -1]
        return PREFERENCES, {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": win[1]}],
            "rejected": [{"role": "assistant", "content": lose[1]}],
            "chosen_model": win[0], "rejected_model": lose[0], **meta,
        }  # fmt: skip
    responses = [{"model": n, "content": t} for n, t in shown]
    return TIES, {"prompt": prompt, "responses": responses, **meta}


@dataclass(frozen=True)
class Game:
    """One vote as a game: ``score`` is 1 if ``a`` won, 0 if ``b`` won, 0.5 for a tie."""

    a: str
    b: str
    score: float
    time: float


def read_games(arena_dir: Path) -> list[Game]:
    """Every vote under ``arena_dir`` as a game, in the order cast."""
    games = []
    for name in (PREFERENCES, TIES):
        path = arena_dir / name
        if not path.is_file() or path.stat().st_size == 0:
            continue
        for _, r in read_jsonl(path, "arena votes"):
            if "chosen_model" in r:
                games.append(Game(r["chosen_model"], r["rejected_model"], 1.0, r.get("time", 0)))
            elif "responses" in r:
                a, b = (x["model"] for x in r["responses"])
                games.append(Game(a, b, 0.5, r.get("time", 0)))
    return sorted(games, key=lambda g: g.time)


def _encode(games: list[Game], players: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Games as arrays: (index of a (G,), index of b (G,), score of a (G,))."""
    index = {p: i for i, p in enumerate(players)}
    a = np.array([index[g.a] for g in games], dtype=np.int64)
    b = np.array([index[g.b] for g in games], dtype=np.int64)
    return a, b, np.array([g.score for g in games], dtype=np.float64)


def _tables(a: np.ndarray, b: np.ndarray, score: np.ndarray, P: int) -> tuple:
    """(wins (P,), games played (P, P)) with ties as half wins."""
    wins = np.bincount(a, score, P) + np.bincount(b, 1 - score, P)
    n = np.zeros((P, P))
    np.add.at(n, (a, b), 1)
    return wins, n + n.T


def _bt(wins: np.ndarray, n: np.ndarray, prior: float, iters: int) -> np.ndarray:
    """Hunter's MM updates p_i <- W_i / sum_j n_ij / (p_i + p_j), on the Elo scale."""
    wins = wins + prior / 2
    p = np.ones(len(wins))
    for _ in range(iters):
        denom = (n / (p[:, None] + p[None, :])).sum(1) + prior / (p + 1.0)
        new = np.maximum(wins / np.maximum(denom, 1e-300), 1e-300)
        if prior == 0:
            new = new / np.exp(np.log(new).mean())  # the plain fit is defined up to a scale
        done = np.max(np.abs(np.log(new) - np.log(p))) < 1e-10
        p = new
        if done:
            break
    scores = 400 * np.log10(p)
    return scores - scores.mean() + 1000


def bradley_terry(
    games: list[Game], players: list[str], prior: float = 1.0, iters: int = 500
) -> np.ndarray:
    """Bradley-Terry log-strengths on the Elo scale (mean 1000), by Hunter's MM
    algorithm. ``prior`` virtual ties against an anchor of strength 1 keep every score
    finite (0 = the plain maximum-likelihood fit)."""
    return _bt(*_tables(*_encode(games, players), len(players)), prior, iters)


def _elo(a: np.ndarray, b: np.ndarray, score: np.ndarray, P: int, k: float = 32.0) -> np.ndarray:
    r = [1000.0] * P
    for i, j, s in zip(a.tolist(), b.tolist(), score.tolist(), strict=True):
        delta = k * (s - 1 / (1 + 10 ** ((r[j] - r[i]) / 400)))
        r[i] += delta
        r[j] -= delta
    return np.array(r)


def elo(games: list[Game], players: list[str], k: float = 32.0) -> np.ndarray:
    """Online Elo ratings after the games in order (start 1000)."""
    return _elo(*_encode(games, players), len(players), k)


def leaderboard(games: list[Game], rounds: int = 200, seed: int = 0) -> dict:
    """Players ranked by Bradley-Terry score, with Elo, 95% bootstrap intervals and
    win/tie/loss counts."""
    players = sorted({g.a for g in games} | {g.b for g in games})
    if not players:
        return {"votes": 0, "players": []}
    P = len(players)
    a, b, score = _encode(games, players)
    bt, el = _bt(*_tables(a, b, score, P), 1.0, 500), _elo(a, b, score, P)
    rng = np.random.default_rng(seed)
    boot_bt, boot_elo = [bt], [el]  # with rounds=0 the interval is the point itself
    for _ in range(rounds):
        pick = np.sort(rng.integers(0, len(games), len(games)))  # keep the cast order
        boot_bt.append(_bt(*_tables(a[pick], b[pick], score[pick], P), 1.0, 200))
        boot_elo.append(_elo(a[pick], b[pick], score[pick], P))
    if rounds:
        boot_bt, boot_elo = boot_bt[1:], boot_elo[1:]
    lo_bt, hi_bt = np.percentile(boot_bt, [2.5, 97.5], axis=0)
    lo_el, hi_el = np.percentile(boot_elo, [2.5, 97.5], axis=0)
    won = np.bincount(a, score == 1, P) + np.bincount(b, score == 0, P)
    tied = np.bincount(a, score == 0.5, P) + np.bincount(b, score == 0.5, P)
    played = np.bincount(a, minlength=P) + np.bincount(b, minlength=P)
    rows = []
    for i, name in enumerate(players):
        rows.append({
            "name": name, "bt": _r(bt[i]), "bt_ci": [_r(lo_bt[i]), _r(hi_bt[i])],
            "elo": _r(el[i]), "elo_ci": [_r(lo_el[i]), _r(hi_el[i])],
            "games": int(played[i]), "wins": int(won[i]), "ties": int(tied[i]),
            "losses": int(played[i] - won[i] - tied[i]),
        })  # fmt: skip
    rows.sort(key=lambda r: -r["bt"])
    return {"votes": len(games), "players": rows, "bootstrap_rounds": rounds}


def _r(x: float) -> float:
    return round(float(x), 1) if math.isfinite(x) else float(x)
