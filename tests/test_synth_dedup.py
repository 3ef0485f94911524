"""Near-duplicate search and decontamination of `fastmath synth`, against brute force on raw n-gram tuples."""
import random
from pathlib import Path

import pytest

from fastmath.synth.dedup import ContaminationIndex, MinHashLSHIndex, NearDupIndex, lsh_params, normalise_text, words

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def grams(text, n):
    """Reference: the set of word n-gram tuples, independent of the hashed implementation."""
    t = text.lower().replace(",", " ").replace(".", " ").replace("?", " ").replace("$", " ").split()
    return {tuple(t[i:i + n]) for i in range(len(t) - n + 1)} if len(t) >= n else {tuple(t)}


def brute_jaccard(a, b, n):
    ga, gb = grams(a, n), grams(b, n)
    return len(ga & gb) / len(ga | gb)


def corpus(rng, size, vocab=60):
    """Random word texts with planted near copies (a few words replaced, inserted or deleted)."""
    lexicon = [f"w{i}" for i in range(vocab)]
    texts = []
    for _ in range(size):
        if texts and rng.random() < 0.5:
            t = rng.choice(texts).split()
            for _ in range(rng.randint(0, 4)):
                op, i = rng.random(), rng.randrange(len(t))
                if op < 0.4:
                    t[i] = rng.choice(lexicon)
                elif op < 0.7:
                    t.insert(i, rng.choice(lexicon))
                elif len(t) > 3:
                    del t[i]
            texts.append(" ".join(t))
        else:
            texts.append(" ".join(rng.choice(lexicon) for _ in range(rng.randint(2, 30))))
    return texts


def test_words_and_normalise_text():
    assert words("Janet’s ducks lay 16 eggs, per-day! $x^2$") == ["janet", "s", "ducks", "lay", "16", "eggs", "per",
                                                                  "day", "x", "2"]
    assert normalise_text("  How MANY apples?\n") == normalise_text("how many apples") == "how many apples"
    assert normalise_text("ｆｕｌｌ width") == "full width"  # NFKC


@pytest.mark.parametrize("n, threshold", [(3, 0.7), (2, 0.5), (3, 0.9), (1, 0.3)])
def test_near_duplicates_match_brute_force(n, threshold):
    rng = random.Random(n * 100 + int(threshold * 10))
    texts = corpus(rng, 400)
    idx = NearDupIndex(n, threshold, reference=texts[:100])
    hits = 0
    for i, text in enumerate(texts):
        sims = [brute_jaccard(text, texts[j], n) for j in range(i)]
        best = max(sims, default=0.0)
        exact = next((j for j in range(i) if texts[j].split() == text.split()), None)
        got = idx.query(text)
        if exact is not None:
            assert got == (exact, 1.0)
        elif best >= threshold:
            assert got is not None and got[1] == pytest.approx(best) and sims[got[0]] == pytest.approx(best)
        else:
            assert got is None
        hits += got is not None
        idx.add(i, text)
    assert 20 < hits < 350  # the corpus exercises both outcomes


def test_remove_and_replace():
    idx = NearDupIndex(3, 0.7)
    a = "tom has three red apples and buys four more apples at the shop"
    idx.add("a", a)
    assert idx.query(a) == ("a", 1.0)
    assert idx.query(a.replace("shop", "market"))[0] == "a"
    idx.remove("a")
    assert idx.query(a) is None and idx.query(a.replace("shop", "market")) is None and len(idx) == 0
    idx.remove("a")  # no-op
    idx.add("b", a)
    idx.add("b", "something else entirely here now")  # replacing a key drops its old text
    assert idx.query(a) is None and idx.query("something else entirely here now") == ("b", 1.0)
    with pytest.raises(ValueError, match="threshold"):
        NearDupIndex(3, 0.0)


def test_contamination_matches_brute_force():
    rng = random.Random(5)
    tests = corpus(rng, 150, vocab=40)
    queries = corpus(random.Random(6), 300, vocab=40) + [t + " w1 w2" for t in tests[:20]]
    for n in (4, 6):
        idx = ContaminationIndex(n)
        for i, t in enumerate(tests):
            idx.add(t, ("test", i))
        flagged = 0
        for q in queries:
            qt = q.split()
            q_grams = {tuple(qt[i:i + n]) for i in range(len(qt) - n + 1)}
            expected = []
            for i, t in enumerate(tests):
                tt = t.split()
                if len(tt) >= n:
                    hit = bool(q_grams & {tuple(tt[j:j + n]) for j in range(len(tt) - n + 1)})
                else:  # a short test question counts when it appears whole
                    hit = any(qt[j:j + len(tt)] == tt for j in range(len(qt) - len(tt) + 1))
                if hit:
                    expected.append(i)
            got = idx.query(q)
            assert (got is not None) == bool(expected), (n, q)
            if got is not None:
                assert got[1] in expected
            flagged += got is not None
        assert 20 <= flagged < len(queries)
        batched = ContaminationIndex(n)  # the vectorised path (a downloaded batch file) answers the same
        for i, t in enumerate(tests):
            batched.add(t, ("test", i))
        batched.prepare(queries)
        assert [batched.query(q) for q in queries] == [idx.query(q) for q in queries]


def test_contamination_reworded_and_short_questions():
    idx = ContaminationIndex(10)
    q = "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning."
    idx.add(q, "gsm8k")
    idx.add("Compute $\\dbinom{8}{4}$.", "math")  # 4 words, shorter than n
    assert idx.query("Mary's ducks lay 16 eggs per day. She eats three for breakfast every morning!") == "gsm8k"
    assert idx.query("Ducks lay eggs. She eats three every morning for breakfast.") is None
    assert idx.query("First, compute \\dbinom{8}{4}, then add 1.") == "math"
    assert idx.query("Compute \\dbinom{8}{5}.") is None
    assert idx.size == 2


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data not present")
def test_real_gsm8k_train_test_overlap_matches_brute_force():
    """10-gram overlap of GSM8K train questions with the test set: the index agrees with brute force on tuples."""
    import json
    load = lambda f: [json.loads(x)["question"] for x in (DATA / f).read_text().splitlines()]  # noqa: E731
    train, test = load("gsm8k_train.jsonl")[:2500], load("gsm8k_test.jsonl")
    idx = ContaminationIndex(10)
    ref = set()
    for i, t in enumerate(test):
        idx.add(t, i)
        w = words(t)
        ref |= {tuple(w[j:j + 10]) for j in range(len(w) - 9)}
    got = [q for q in train if idx.query(q) is not None]
    expected = [q for q in train if any(tuple(words(q)[j:j + 10]) in ref for j in range(len(words(q)) - 9))]
    assert got == expected and 0 < len(got) < 25  # GSM8K has a few near copies across the split


@pytest.mark.parametrize("n, threshold", [(3, 0.7), (2, 0.5)])
def test_minhash_index_against_brute_force(n, threshold):
    """Every reported near duplicate has its exact Jaccard (verified, never estimated); recall of pairs at or
    above the threshold; `prepare` and a pickle round trip (the resume snapshot) change no answer."""
    import pickle

    texts = corpus(random.Random(n * 7 + int(threshold * 10)), 500) + ["", "w1", "w1 w2"]
    idx, batched = MinHashLSHIndex(n, threshold, pending_limit=300), MinHashLSHIndex(n, threshold)
    batched.prepare(texts)
    found = should = 0
    answers = []
    for i, text in enumerate(texts):
        sims = [brute_jaccard(text, texts[j], n) if texts[j].split() and text.split() else 0.0 for j in range(i)]
        got = idx.query(text)
        assert batched.query(text) == got
        answers.append(got)
        if got is not None:
            assert got[1] == pytest.approx(sims[got[0]]) and got[1] >= threshold
        if max(sims, default=0.0) >= threshold:
            should += 1
            found += got is not None
        else:
            assert got is None
        idx.add(i, text)
        batched.add(i, text)
        if i == 250:
            idx = pickle.loads(pickle.dumps(idx))
    assert should > 80 and found / should >= 0.99
    assert len(idx) == len(texts)
    idx.remove(3)
    assert idx.query(texts[3]) is None or idx.query(texts[3])[0] != 3


def test_lsh_params_reach_the_recall_target():
    for t in (0.3, 0.5, 0.7, 0.9):
        bands, rows = lsh_params(t)
        assert 1 - (1 - t ** rows) ** bands >= 0.9995 and bands <= 32
    assert lsh_params(0.7) == (28, 4)
