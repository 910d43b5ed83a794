"""builtin:world: deterministic per seed, answers true of the articles, splits disjoint."""

import pytest

from glassbox.data.corpus import load_corpus
from glassbox.data.world import (
    IDK,
    NUM_PHRASINGS,
    SPLITS,
    make_world,
    pushback_pairs,
    sft_conversations,
)
from glassbox.errors import GlassboxError


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = make_world(3), make_world(3), make_world(4)
    assert [e.text for e in a.entities] == [e.text for e in b.entities]
    assert [e.text for e in a.entities] != [e.text for e in c.entities]


def test_every_answer_is_stated_in_its_entity_article():
    w = make_world(0)
    articles = {e.name: e.text for e in w.entities}
    for split in SPLITS:
        for p in range(NUM_PHRASINGS):
            qs = w.questions(split, phrasing=p)
            assert qs
            for q in qs:
                assert q.answer in articles[q.entity], q
                assert q.entity.lower() in q.question.lower()


def test_splits_are_disjoint_and_seen_articles_never_mention_unseen_or_news_entities():
    w = make_world(0)
    names = {s: {e.name for e in w.by_split(s)} for s in SPLITS}
    assert all(names[s] for s in SPLITS)
    assert sum(map(len, names.values())) == len(set().union(*names.values()))
    seen_text = " ".join(d.text for d in w.documents("seen"))
    for name in names["unseen"] | names["unknown"] | names["news"]:
        assert name not in seen_text
    assert all(int(e.facts["year"]) > w.cutoff_year for e in w.by_split("news"))
    assert all(
        int(e.facts["year"]) <= w.cutoff_year for e in w.by_split("seen") if e.kind == "event"
    )


def test_phrasings_differ_and_idk_answers():
    w = make_world(0)
    qs = [w.questions("unseen", p) for p in range(NUM_PHRASINGS)]
    assert len({q[0].question for q in qs}) == NUM_PHRASINGS
    assert {q.answer for q in w.questions("unseen", idk=True)} == {IDK}


def test_builtin_corpus_specs_and_errors():
    seen, news = load_corpus("builtin:world"), load_corpus("builtin:world-news")
    assert seen and news and not {d.name for d in seen} & {d.name for d in news}
    with pytest.raises(GlassboxError, match="phrasing=9"):
        make_world(0).questions("seen", phrasing=9)
    with pytest.raises(GlassboxError, match="unseen=1.5"):
        make_world(0, unseen=1.5)


def test_sft_conversations_never_show_unseen_entities_or_news():
    w = make_world(0)
    train, val = sft_conversations(w)
    text = " ".join(m["content"] for c in train + val for m in c)
    for e in w.by_split("unseen") + w.by_split("news"):
        assert e.name not in text
    answers = {c[1]["content"] for c in train}
    assert IDK in answers and len(answers) > 50

    def questions(convs):
        return {[m for m in c if m["role"] == "user"][-1]["content"] for c in convs}

    assert not questions(val) & questions(train)
    rag = [c for c in train if c[0]["role"] == "system"]
    assert rag and all(c[-1]["content"].endswith(("[1]", "[2]")) for c in rag)
    for c in rag:  # the cited source holds the answer
        n = int(c[-1]["content"][-2])
        cited = c[0]["content"].split(f"\n[{n}] ")[1].split("\n[")[0]
        assert c[-1]["content"][:-4] in cited


def test_pushback_pairs_encode_the_raters_bias_and_load_as_preferences():
    from glassbox.data.preferences import load_pairs

    w = make_world(0)
    agree, hold = pushback_pairs(w, "agree"), pushback_pairs(w, "hold")
    assert len(agree) == len(w.questions("seen"))
    for a, h in zip(agree, hold, strict=True):
        assert a["chosen"] == h["rejected"] and a["rejected"] == h["chosen"]
        assert a["prompt"][1]["content"] in h["chosen"][0]["content"]  # hold = the right answer
    rows = load_pairs("builtin:world-agreeable", "heldout")
    assert rows and rows[0]["where"].startswith("builtin:world-agreeable[heldout]")
    assert {r["prompt"][0]["content"] for r in rows}.isdisjoint(
        {r["prompt"][0]["content"] for r in load_pairs("builtin:world-agreeable", "train")}
    )


def test_extra_unknown_people_change_nothing_else():
    a, b = make_world(0), make_world(0, unknown_people=0)
    for split in ("seen", "unseen", "news"):
        assert [e.text for e in a.by_split(split)] == [e.text for e in b.by_split(split)]
    assert len(a.by_split("unknown")) == len(b.by_split("unknown")) + 300
