"""Data: record formats, answer rewriting, the prompt, tokenization cache, labels vs a brute force, packing."""
import json
from pathlib import Path

import numpy as np
import pytest

from fastmath import data as D
from fastmath.synth.procedural import SMALL_CONFIG, ProceduralConfig, generate
from fastmath.tokenizer import train_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    recs = generate(300, ProceduralConfig(max_steps=3, ops=("add", "sub", "mul", "div")), seed=5)
    texts = [D.render_prompt(r["question"]) for r in recs] + [r["solution"] for r in recs]
    texts += ["Natalia sold 48/2 = 24 clips. #### $\\boxed{\\frac{1}{2}}$ What is the value?"]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=400)


def write_jsonl(path, recs):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


def test_render_prompt_is_vicuna_v11():
    p = D.render_prompt("What is 2+3?")
    assert p == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions. USER: What is 2+3? ASSISTANT:")
    assert D.render_prompt("Q?", "plain") == "Question: Q?\nAnswer:"
    assert D.render_prompt("Q?", "<<{question}>>") == "<<Q?>>"
    with pytest.raises(ValueError, match="unknown prompt template"):
        D.render_prompt("Q?", "alpaca")


def test_record_formats_and_answer_rewriting():
    g = D.record_to_example({"question": "Q", "answer": "She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,024"})
    assert g.response == "She sold 48/2 = 24 clips.\nThe answer is: 1024" and g.answer == "1024"
    m = D.record_to_example({"problem": "P", "solution": "So $x=\\boxed{\\frac{1}{2}}$ and \\boxed{3^{2}}."})
    assert m.response.endswith("\nThe answer is: 3^{2}") and m.answer == "3^{2}"
    f = D.record_to_example({"question": "Q", "solution": "1 + 1 = 2", "answer": 2})
    assert f.response == "1 + 1 = 2\nThe answer is: 2"
    f2 = D.record_to_example({"question": "Q", "solution": "1 + 1 = 2\nThe answer is: 2", "answer": "2"})
    assert f2.response == "1 + 1 = 2\nThe answer is: 2"
    t = D.record_to_example({"text": "plain words"})
    assert t.prompt is None and t.response == "plain words"
    assert D.last_boxed("a \\boxed{\\frac{a}{b}} b") == "\\frac{a}{b}"
    assert D.last_boxed("no box") is None


@pytest.mark.skipif(not SHARED.is_dir(), reason="reference data absent")
def test_reference_files_read():
    gsm = D.read_examples(SHARED / "gsm8k_test.jsonl")
    assert len(gsm) == 1319 and all("<<" not in e.response and "####" not in e.response for e in gsm)
    assert all(e.response.endswith("The answer is: " + e.answer) for e in gsm)
    math = D.read_examples(SHARED / "math_test_1000.jsonl")
    assert len(math) == 1000 and all(e.response.endswith("The answer is: " + e.answer) for e in math)


def test_bad_files_name_file_and_line(tmp_path):
    good = {"question": "Q", "answer": "x\n#### 3"}
    bad_json = write_jsonl(tmp_path / "a.jsonl", [good, "{not json"])
    with pytest.raises(ValueError, match=r"a\.jsonl:2: malformed JSON"):
        D.read_examples(bad_json)
    unknown = write_jsonl(tmp_path / "b.jsonl", [good, good, {"prompt": "x", "completion": "y"}])
    with pytest.raises(ValueError, match=r"b\.jsonl:3: unknown record"):
        D.read_examples(unknown)
    no_hash = write_jsonl(tmp_path / "c.jsonl", [{"question": "Q", "answer": "no final line"}])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: .*####"):
        D.read_examples(no_hash)
    empty = tmp_path / "d.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"d\.jsonl: empty file"):
        D.read_examples(empty)


def test_tokenization_boundaries_and_cache(tok, tmp_path, monkeypatch):
    recs = generate(40, SMALL_CONFIG, seed=1) + [{"text": "Ava has 3 apples."}]
    path = write_jsonl(tmp_path / "p.jsonl", recs)
    calls = []
    real = D.tokenize_examples
    monkeypatch.setattr(D, "tokenize_examples", lambda *a, **k: calls.append(1) or real(*a, **k))
    docs, hit = D.load_tokenized(path, tok, cache_dir=tmp_path / "cache")
    assert not hit
    again, hit = D.load_tokenized(path, tok, cache_dir=tmp_path / "cache")
    assert hit and len(calls) == 1
    np.testing.assert_array_equal(docs.tokens, again.tokens)
    np.testing.assert_array_equal(docs.n_prompt, again.n_prompt)
    assert again.answers == docs.answers
    _, hit = D.load_tokenized(path, tok, template="plain", cache_dir=tmp_path / "cache")
    assert not hit, "the template is part of the cache key"
    for i, r in enumerate(recs[:-1]):
        ids = docs.doc(i).tolist()
        prompt = D.encode_prompt(tok, r["question"])
        assert ids[:docs.n_prompt[i]] == prompt  # the sampler's prompt is exactly training's
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
        assert tok.decode(ids[docs.n_prompt[i]:]) == r["solution"]
    assert docs.n_prompt[-1] == 1  # plain text: only BOS has no target before it


def brute_force_pack(docs, doc_ids):
    """Per-document construction, written independently of data.flat_labels/make_batch."""
    tokens, labels, positions, bounds = [], [], [], [0]
    for d in doc_ids:
        ids = docs.doc(d).tolist()
        for t, tid in enumerate(ids):
            tokens.append(tid)
            positions.append(t)
            nxt_is_target = t + 1 < len(ids) and t + 1 >= docs.n_prompt[d]
            labels.append(ids[t + 1] if nxt_is_target else -100)
        bounds.append(bounds[-1] + len(ids))
    return tokens, labels, positions, bounds


def test_packed_batch_matches_brute_force(tok):
    exs = [D.record_to_example(r) for r in generate(30, SMALL_CONFIG, seed=2)] + [D.Example(None, "Mia has 4 cards.")]
    docs = D.tokenize_examples(exs, tok)
    labels = D.flat_labels(docs)
    for i in range(len(docs)):
        np.testing.assert_array_equal(labels[docs.offsets[i]:docs.offsets[i + 1]],
                                      D.doc_labels(docs.doc(i), docs.n_prompt[i]))
    ids = [3, 0, 30, 17, 9]
    b = D.make_batch(docs, labels, ids)
    tokens, lab, pos, bounds = brute_force_pack(docs, ids)
    assert b.tokens.tolist() == tokens and b.labels.tolist() == lab and b.positions.tolist() == pos
    assert b.cu_seqlens.dtype == np.int32 and b.cu_seqlens.tolist() == bounds
    assert b.max_seqlen == max(len(docs.doc(i)) for i in ids)
    assert b.n_targets == sum(x != -100 for x in lab)
    # every response token (including EOS) is a target exactly once; no prompt token is
    n_resp = sum(len(docs.doc(i)) - docs.n_prompt[i] for i in ids)
    assert b.n_targets == n_resp


def test_best_fit_decreasing_invariants():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=500)
    budget = 256
    packs = D.pack_best_fit(lengths, budget)
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(500)), "every document exactly once"
    loads = [int(lengths[p].sum()) for p in packs]
    assert max(loads) <= budget
    assert len(packs) >= -(-int(lengths.sum()) // budget)
    # best fit decreasing: no two packs could be merged (otherwise a later document would have fit)
    assert sum(1 for a in loads if a <= budget // 2) <= 1
    # exact known case: BFD packs 6,5,4,3,2 into budget 10 as [6,4],[5,3,2]
    p = D.pack_best_fit([6, 5, 4, 3, 2], 10)
    assert sorted(sorted([6, 5, 4, 3, 2][i] for i in pk) for pk in p) == [[2, 3, 5], [4, 6]]
    with pytest.raises(ValueError, match="exceeds the pack budget"):
        D.pack_best_fit([11], 10)


def test_over_length_and_mixing(tok):
    exs = [D.record_to_example(r) for r in generate(20, SMALL_CONFIG, seed=3)]
    docs = D.tokenize_examples(exs, tok)
    cut = int(np.median(docs.lengths))
    n_over = int((docs.lengths > cut).sum())
    dropped, c = D.limit_length(docs, cut, "drop")
    assert c == {"over_length": n_over, "dropped": n_over, "truncated": 0} and len(dropped) == 20 - n_over
    trunc, c = D.limit_length(docs, cut, "truncate")
    assert c["truncated"] == n_over and len(trunc) == 20 and trunc.lengths.max() == cut
    lab = D.flat_labels(trunc)
    assert (lab[trunc.offsets[1:] - 1] == -100).all()
    mixed = D.mix([docs, dropped], [2, 0.5], seed=1)
    assert len(mixed) == 2 * len(docs) + round(0.5 * len(dropped))
    with pytest.raises(ValueError, match="mixing weights"):
        D.mix([docs], [1, 2])


@pytest.mark.parametrize("world", [1, 2])
def test_stream_covers_every_document_each_epoch(tok, world):
    exs = [D.record_to_example(r) for r in generate(200, ProceduralConfig(max_steps=4), seed=4)]
    docs = D.tokenize_examples(exs, tok)
    budget = int(docs.lengths.max()) * 3
    s = D.PackedStream(docs, budget, accum=2, world_size=world, seed=7)
    assert 0.8 < s.efficiency() <= 1.0
    steps = s.steps_for_epochs(2)
    seen = []
    for step in range(steps):
        per_rank = [s.step(step, r) for r in range(world)]
        assert all(len(b) == 2 for b, _ in per_rank), "every rank runs accum micro-batches"
        n_total = per_rank[0][1]
        assert all(n == n_total for _, n in per_rank)
        assert n_total == sum(b.n_targets for bs, _ in per_rank for b in bs)
        seen += [i for p in s.packs_of_step(step) for i in p]
    counts = np.bincount(seen, minlength=len(docs))
    spill = sum(len(p) for p in s.packs_of_step(steps - 1))
    assert counts.min() >= 2 and counts.sum() - 2 * len(docs) <= spill  # only the last step spills over
    assert s.packs_of_step(0) != D.PackedStream(docs, budget, 2, world, seed=8).packs_of_step(0)
    assert s.epoch_packs(0) != s.epoch_packs(1), "each epoch is reshuffled"
