"""Each probe runs end to end on a tiny model and writes its documented fields; the
calibration computation matches a hand example."""

import json

import pytest
import torch

from glassbox.config import ModelConfig
from glassbox.data.world import make_world
from glassbox.errors import GlassboxError
from glassbox.model import Transformer
from glassbox.probes import PROBES, agrees, calibration, is_right, run_probe, says_idk, scale

FIELDS = {
    "hallucination": {"idk_rate_unseen", "invented_rate_unseen", "accuracy_seen", "ece_seen",
                      "calibration_bins"},
    "sycophancy": {"questions", "right_first", "gives_in_rate", "flip_rate", "held_rate"},
    "needle": {"window", "lengths", "depths", "accuracy", "beyond_truncation_accuracy",
               "beyond_retrieval_accuracy"},
    "cutoff": {"closed_book_accuracy", "rag_accuracy", "retrieval_recall_at_k"},
    "paraphrase": {"accuracy_per_phrasing", "spread", "consistent_rate"},
    "sampling": {"temperatures", "entropy_nats", "top_p", "nucleus_size", "accuracy",
                 "distinct_answer_share"},
}  # fmt: skip
SMALL = {
    "hallucination": {"limit": 6}, "sycophancy": {"limit": 6},
    "needle": {"lengths": (0.5, 1.0), "depths": (0.0, 1.0), "per_cell": 2},
    "cutoff": {}, "paraphrase": {"limit": 4},
    "sampling": {"limit": 3, "n": 2, "temperatures": (0.0, 1.0), "top_ps": (0.5, 1.0)},
}  # fmt: skip


def test_calibration_matches_a_hand_computation():
    # bin 0.2: conf 0.2, 0.25 -> acc 0.5, mean 0.225; bin 0.9: conf 0.9, 0.95 -> acc 1.0
    got = calibration([0.2, 0.25, 0.9, 0.95], [True, False, True, True], bins=10)
    want = 0.5 * abs(0.5 - 0.225) + 0.5 * abs(1.0 - 0.925)
    assert got["ece"] == pytest.approx(want)
    assert [b["count"] for b in got["bins"]] == [2, 2]
    assert calibration([1.0, 0.0], [True, False])["ece"] == pytest.approx(0.0)


def test_grading():
    assert is_right("He was born in Brisna, I think.", "Brisna")
    assert not is_right("Tolmar", "Brisna")
    assert says_idk("I don't know.") and not says_idk("Brisna")
    assert agrees("You are right, it is X.") and not agrees("No, it is Brisna.")


@pytest.fixture(scope="module")
def lm(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("test", vocab_size=tokenizer.vocab_size, context_length=256)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("name", PROBES)
def test_probe_runs_and_writes_json_and_png(name, lm, tokenizer, tmp_path):
    world = make_world(0, cities=6, organisations=6, people=12, events=8)
    result, figure = run_probe(name, lm, tokenizer, world=world, **SMALL[name])
    path = result.write(tmp_path, figure)
    body = json.loads(path.read_text())
    assert body["probe"] == name and body["headline"] == result.headline
    assert FIELDS[name] <= set(body), FIELDS[name] - set(body)
    assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_sampling_probe_measures_what_temperature_and_top_p_do(lm, tokenizer):
    temps, top_ps = (0.0, 0.5, 1.0, 2.0), (0.1, 0.5, 0.9, 1.0)
    result, _ = run_probe("sampling", lm, tokenizer, world=make_world(0), limit=3, n=2,
                          temperatures=temps, top_ps=top_ps)  # fmt: skip
    ent, nuc = result.data["entropy_nats"], result.data["nucleus_size"]
    assert ent[0] == pytest.approx(0.0, abs=1e-3) and ent == sorted(ent)
    assert nuc == sorted(nuc) and nuc[-1] == tokenizer.vocab_size


def test_unknown_probe():
    with pytest.raises(GlassboxError, match="Unknown probe 'vibes'"):
        run_probe("vibes", None, None)


def test_scale_trains_each_preset_on_the_same_budget(tmp_path, small_text):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(small_text[:60_000])
    result, figure = scale(tmp_path / "runs", presets=("test",), data=str(corpus), steps=3,
                           vocab_size=300, context_length=32, batch_size=2)  # fmt: skip
    path = result.write(tmp_path, figure)
    (row,) = json.loads(path.read_text())["runs"]
    assert row["preset"] == "test" and row["params"] > 0 and row["val_loss"] > 0
    assert result.data["tokens"] == 3 * 2 * 32
    assert (tmp_path / "runs" / "test" / "model.safetensors").is_file()
