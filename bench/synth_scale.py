"""Dedup + decontamination of `fastmath synth` at the paper's scale: time, peak RSS and near-duplicate recall.

Streams N synthetic GSM8K-style questions (generated from their index, never all in memory) through what
`fastmath synth` does per created question: ContaminationIndex.query (10-grams of a 6,300-question
evaluation set), MinHashLSHIndex.query, then add when kept. A labelled sample of planted near copies
(random word edits, bucketed by their EXACT Jaccard of word 3-gram tuples, computed without any hashing)
gives recall per band 0.70-0.75, ..., 0.95-1.0, 1.0, and the 0.60-0.70 band below the threshold (should
not be flagged unless another text is a duplicate).

    python bench/synth_scale.py                       # 10K, 100K, 1M and 1.44M, each in a fresh process
    python bench/synth_scale.py --sizes 10000 100000  # quicker
    python bench/synth_scale.py --resume-scale 100000 1000000  # a rerun's start-up: snapshot vs full replay
Writes bench/results/synth_scale.json (or $FASTMATH_BENCH_OUT). Single-threaded (the index is pure Python +
numpy with one thread); note `uptime` beside the figures: the machine is shared.
"""
import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # last, not first: the repo's kernels/ must not shadow the `kernels` package transformers imports

BANDS = [(0.60, 0.70), (0.70, 0.75), (0.75, 0.80), (0.80, 0.85), (0.85, 0.90), (0.90, 0.95), (0.95, 1.0), (1.0, 1.0)]
PER_BAND = 250
_SYL = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
FUNCTION = "the a of and to in for with each more than how many much does did is are was has had after before".split()


def _lexicon(size, seed):
    rng = random.Random(seed)
    return sorted({"".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))) for _ in range(size)})


NAMES, THINGS, VERBS = _lexicon(3000, 1), _lexicon(20000, 2), _lexicon(2000, 3)


def question(i, salt="q"):
    """A GSM8K-like question of 30-70 words, a pure function of its index."""
    rng = random.Random(f"{salt}:{i}")
    name = rng.choice(NAMES).capitalize()
    parts = []
    for _ in range(rng.randint(3, 6)):
        thing, verb = rng.choice(THINGS), rng.choice(VERBS)
        pattern = rng.randrange(4)
        if pattern == 0:
            parts.append(f"{name} {verb}s {rng.randint(2, 999)} {thing} {rng.choice(FUNCTION)} {rng.choice(THINGS)}.")
        elif pattern == 1:
            parts.append(f"Each {thing} {verb}s {rng.randint(2, 99)} {rng.choice(THINGS)} {rng.choice(FUNCTION)} the "
                         f"{rng.choice(THINGS)}.")
        elif pattern == 2:
            parts.append(f"After {rng.randint(2, 30)} days, {rng.randint(2, 60)} percent of the {thing} are "
                         f"{rng.choice(VERBS)}ed.")
        else:
            parts.append(f"The {thing} costs ${rng.randint(2, 500)} more than the {rng.choice(THINGS)}.")
    parts.append(f"How many {rng.choice(THINGS)} does {name} {rng.choice(VERBS)} in total?")
    return " ".join(parts)


def tuple_grams(text, n=3):
    from fastmath.synth.dedup import words
    t = words(text)
    return {tuple(t[i:i + n]) for i in range(len(t) - n + 1)} if len(t) >= n else {tuple(t)}


def exact_jaccard(a, b):
    ga, gb = tuple_grams(a), tuple_grams(b)
    return len(ga & gb) / len(ga | gb)


def edit(text, rng, k):
    """k random word edits (replace / insert / delete)."""
    w = text.split()
    for _ in range(k):
        op, i = rng.random(), rng.randrange(len(w))
        if op < 0.5:
            w[i] = rng.choice(THINGS)
        elif op < 0.8:
            w.insert(i, rng.choice(THINGS))
        elif len(w) > 5:
            del w[i]
    return " ".join(w)


def plant(n, seed=0):
    """{position: (original index, text, exact Jaccard, band)} for PER_BAND copies per band (fewer when n is
    small), each placed after its original."""
    rng = random.Random(seed)
    per_band = min(PER_BAND, max(20, n // 200))
    want = {b: per_band for b in BANDS}
    planted, origs = {}, set()
    while any(want.values()):
        orig = rng.randrange(1, n // 2)
        if orig in planted or orig % 1000 == 0:  # the original must be an ordinary question
            continue
        base = question(orig)
        text = edit(base, rng, rng.choice([0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8]))
        j = exact_jaccard(base, text)
        band = next((b for b in BANDS if (b[0] <= j < b[1]) or (b[0] == b[1] == j)), None)
        if band is None or not want[band]:
            continue
        pos = rng.randrange(orig + 1, n)
        if pos in planted or pos in origs or pos % 1000 == 0:
            continue
        origs.add(orig)
        planted[pos] = (orig, text, j, band)
        want[band] -= 1
    return planted


def worker(n, threshold=0.7):
    from fastmath.synth.dedup import ContaminationIndex, MinHashLSHIndex

    planted = plant(n)
    contam = ContaminationIndex(10)
    for i in range(6300):  # the sizes of GSM8K test (1,319) + MATH test (5,000)
        contam.add(question(i, salt="test"), ("test", i))
    contaminated = {p for p in range(0, n, 1000) if p not in planted}  # every 1000th: a test question, reworded
    near = MinHashLSHIndex(3, threshold)
    flagged, kept, n_contam, seconds = {}, 0, 0, 0.0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chunk = 1000  # questions arrive in bulk (a downloaded batch file); `prepare` sketches them in one pass
    for start in range(0, n, chunk):
        texts = []
        for i in range(start, min(n, start + chunk)):  # generating the text is not timed
            if i in planted:
                texts.append(planted[i][1])
            elif i in contaminated:
                texts.append("Suppose " + question(i % 6300, salt="test")[:-1] + " now?")
            else:
                texts.append(question(i))
        t0 = time.perf_counter()
        contam.prepare(texts)
        dirty = [contam.query(t) is not None for t in texts]
        n_contam += sum(dirty)
        near.prepare([t for t, d in zip(texts, dirty) if not d])
        for i, text, d in zip(range(start, start + chunk), texts, dirty):
            if d:
                continue
            hit = near.query(text)
            if i in planted:
                flagged[i] = hit
            if hit is None:
                near.add(i, text)
                kept += 1
        seconds += time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the resume snapshot's bulk is this index: time to write it (pickle + fsync) and to read it back
    import pickle
    import tempfile
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR")) as f:
        t0 = time.perf_counter()
        pickle.dump(near, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
        t_dump = time.perf_counter() - t0
        size = f.tell()
        f.seek(0)
        t0 = time.perf_counter()
        loaded = pickle.load(f)
        t_load = time.perf_counter() - t0
    assert len(loaded) == len(near)
    del loaded
    bands = {}
    wrong = 0
    for pos, (orig, text, j, band) in planted.items():
        b = bands.setdefault(f"{band[0]:.2f}-{band[1]:.2f}" if band[0] < 1 else "1.00", {"pairs": 0, "flagged": 0})
        b["pairs"] += 1
        hit = flagged.get(pos)
        if hit is not None:
            b["flagged"] += 1
            if exact_jaccard(text, question(hit[0])) < threshold - 1e-9:  # reported similarity must be real
                wrong += 1
    for b in bands.values():
        b["recall"] = round(b["flagged"] / b["pairs"], 4)
    return {"n": n, "seconds": round(seconds, 2), "questions_per_s": round(n / seconds),
            "peak_rss_mb": round(peak / 1024),
            "snapshot_of_index": {"mb": round(size / 2**20), "write_s": round(t_dump, 2), "read_s": round(t_load, 2)}, "rss_before_index_mb": round(rss0 / 1024), "kept": kept,
            "contaminated": n_contam, "contaminated_planted": len(contaminated), "index": near.describe(),
            "per_band": dict(sorted(bands.items())), "flagged_below_threshold_by_exact_check": wrong}


def datasketch_reference(n):
    """datasketch's MinHashLSH (num_perm 128, threshold 0.7; distilabel's MinHashDedup) on the same questions:
    insert only, no exact verification; resident bytes per question and questions/s."""
    from datasketch import MinHash, MinHashLSH

    from fastmath.synth.dedup import words
    texts = [question(i) for i in range(n)]
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lsh = MinHashLSH(threshold=0.7, num_perm=128)
    t0 = time.perf_counter()
    for i, text in enumerate(texts):
        w = words(text)
        m = MinHash(num_perm=128)
        m.update_batch([" ".join(w[j:j + 3]).encode() for j in range(len(w) - 2)])
        lsh.query(m)
        lsh.insert(i, m)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": n, "questions_per_s": round(n / seconds), "resident_bytes_per_question": round((r1 - r0) * 1024 / n)}


# ---------------------------------------------------------------------------------------------------------------
# --resume-scale: start-up of a rerun over a large journal, from the snapshot vs a full replay


def write_large_journal(directory, n):
    """A finished synchronous run of n items without any API call: seeds, then the journal `run_synth` would
    have written (its header for these arguments, then per item the question reply and the answer reply, with
    the keys `_run_live` journals). Questions are `question(i)` (distinct; no near copies). Returns the cfg."""
    from fastmath.synth.pipeline import JOURNAL_VERSION, SynthConfig, _fingerprint, _setup, output_paths, run_arguments

    directory = Path(directory)
    seeds = directory / "seeds.jsonl"
    with open(seeds, "w") as f:
        for i in range(50):
            f.write(json.dumps({"question": f"Seed {i}: Ann has {i + 3} pens and buys {2 * i + 1} more pens. "
                                            "How many pens does Ann have now?",
                                "answer": f"{i + 3} + {2 * i + 1} = {3 * i + 4}\n#### {3 * i + 4}"}) + "\n")
    cfg = SynthConfig(seeds=seeds, out=directory / "out.jsonl", num_questions=n, model="gpt-4o-mini",
                      base_url="http://127.0.0.1:9/v1", progress=False)  # never contacted: the run is complete
    _, n_target, max_items, _ = _setup(cfg)
    args = run_arguments(cfg, n_target, max_items)
    header = {"type": "header", "version": JOURNAL_VERSION, "fingerprint": _fingerprint(args), "args": args,
              "run_id": "bench0resume", "paths": {"seeds": str(seeds), "decontaminate": []}}
    t = 1.7e9
    with open(output_paths(cfg.out)["journal"], "w", encoding="utf-8") as f:
        f.write(json.dumps(header, ensure_ascii=False) + "\n")
        for i in range(n):
            q = question(i)
            qtext = (f"CREATED QUESTION: {q}\nVERIFICATION AND MODIFICATION: The problem is solvable; no change "
                     f"needed.\nFINAL CREATED QUESTION: {q}")
            c = i % 997 + 3
            atext = (f"First count what is kept.\nThen add what is found: {c - 1} + 1 = {c}.\n"
                     f"FINAL ANSWER: {c}\nThe answer is: {c}")
            for kind, text, pt, ct in (("question", qtext, 180, len(qtext.split())), ("answer", atext, 90, 20)):
                f.write(json.dumps({"item": i, "kind": kind, "slot": 0, "text": text, "prompt_tokens": pt,
                                    "completion_tokens": ct, "model": "gpt-4o-mini-2024-07-18",
                                    "finish_reason": "stop", "id": f"chatcmpl-{kind[0]}{i}",
                                    "time": round(t + i * 0.01, 3)}, ensure_ascii=False) + "\n")
    return cfg


def resume_worker(directory, n):
    """One `run_synth` over the finished run in `directory` (in a fresh process, so peak RSS is this run's):
    seconds until it would send its first request (entry of the request loop), snapshot read/write, total."""
    t_start = time.perf_counter()
    from fastmath.synth import client, pipeline  # noqa: F401 (run_synth imports the client: openai, counted here)

    cfg = pipeline.SynthConfig(seeds=Path(directory) / "seeds.jsonl", out=Path(directory) / "out.jsonl",
                               num_questions=n, model="gpt-4o-mini", base_url="http://127.0.0.1:9/v1", progress=False)
    marks = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                marks[name] = marks.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    run_live = pipeline._run_live

    async def first_request(*a, **k):  # the loop that sends requests starts here
        marks["to_request_loop_s"] = time.perf_counter() - t0
        return await run_live(*a, **k)

    pipeline.read_snapshot = timed("snapshot_read_s", pipeline.read_snapshot)
    pipeline.write_snapshot = timed("snapshot_write_s", pipeline.write_snapshot)
    pipeline._run_live = first_request
    t0 = time.perf_counter()
    report = pipeline.run_synth(cfg, "bench-key")
    total = time.perf_counter() - t0
    assert report["complete"] and report["kept"] == n and not report["stopped"], report
    return {"from_snapshot": report["resumed_from_journal"]["from_snapshot"],
            "journal_entries_replayed": report["resumed_from_journal"]["replies"],
            "imports_s": round(t0 - t_start, 2),
            "to_first_request_s": round(marks["to_request_loop_s"], 2),
            "snapshot_read_s": round(marks.get("snapshot_read_s", 0.0), 2),
            "snapshot_write_s": round(marks.get("snapshot_write_s", 0.0), 2),
            "run_synth_total_s": round(total, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "requests_sent": report["usage"]["requests"] - 2 * n}


def resume_scale(n, directory=None):
    """Full replay (no snapshot) then snapshot resume of a finished n-item run, each in a fresh process."""
    import shutil
    import tempfile

    from fastmath.synth.pipeline import output_paths

    directory = Path(directory or tempfile.mkdtemp(prefix=f"synth-resume-{n}-", dir=os.environ.get("TMPDIR")))
    try:
        t0 = time.perf_counter()
        cfg = write_large_journal(directory, n)
        t_write = time.perf_counter() - t0
        paths = output_paths(cfg.out)
        out = {"n_items": n, "journal_entries": 2 * n, "journal_mb": round(paths["journal"].stat().st_size / 2**20),
               "journal_written_s": round(t_write, 1)}
        for phase in ("full_replay", "snapshot_resume"):
            load = os.getloadavg()
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, __file__, "--resume-worker", str(n), str(directory)],
                                 capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                          OPENBLAS_NUM_THREADS="1"))
            if res.returncode:
                raise SystemExit(res.stderr[-3000:])
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r["process_wall_s"] = round(time.perf_counter() - t0, 2)
            r["load_avg_before"] = [round(x, 2) for x in load]
            out[phase] = r
            print(f"n={n} {phase}: first request after {r['to_first_request_s']} s (process {r['process_wall_s']} s, "
                  f"{r['journal_entries_replayed']} entries replayed), peak RSS {r['peak_rss_mb']} MB, "
                  f"load {r['load_avg_before']}", flush=True)
        assert out["full_replay"]["from_snapshot"] is False and out["snapshot_resume"]["from_snapshot"] is True
        out["snapshot_mb"] = round(paths["snapshot"].stat().st_size / 2**20)
        out["records_mb"] = round(paths["records"].stat().st_size / 2**20)
        return out
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 1_440_000])
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--datasketch", type=int, default=None, metavar="N",
                   help="Only measure datasketch's MinHashLSH on N questions and add it to the result file.")
    p.add_argument("--resume-scale", type=int, nargs="+", default=None, metavar="N",
                   help="Only measure a rerun's start-up over a finished N-item journal (2N replies): full replay "
                        "vs snapshot resume, and add it to the result file under 'resume'.")
    p.add_argument("--resume-worker", nargs=2, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.resume_worker is not None:
        print(json.dumps(resume_worker(a.resume_worker[1], int(a.resume_worker[0]))))
        return
    if a.worker is not None:
        print(json.dumps(worker(a.worker)))
        return
    path = Path(os.environ.get("FASTMATH_BENCH_OUT", ROOT / "bench" / "results" / "synth_scale.json"))
    if a.datasketch:
        r = datasketch_reference(a.datasketch)
        r["load_avg_before"] = [round(x, 2) for x in os.getloadavg()]
        print(f"datasketch MinHashLSH, {r['n']} questions: {r['resident_bytes_per_question']} B/question, "
              f"{r['questions_per_s']} q/s")
        doc = json.loads(path.read_text()) if path.exists() else {"bench": "synth_scale"}
        doc["datasketch_reference"] = r
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return
    if a.resume_scale:
        doc = json.loads(path.read_text()) if path.exists() else {"bench": "synth_scale"}
        runs = {r["n_items"]: r for r in doc.get("resume", {}).get("results", [])}
        for n in a.resume_scale:
            runs[n] = resume_scale(n)
            doc["resume"] = {
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": 1,
                "what": "run_synth on a finished synchronous run (consistency 1, minhash dedup, no decontamination; "
                        "journal = header + a question and an answer reply per item, as _run_live writes them): "
                        "to_first_request_s = from the run_synth call to the entry of its request loop (which sends "
                        "nothing: the run is complete); full_replay has no snapshot, snapshot_resume loads the one "
                        "the full replay wrote. Each in a fresh process (peak RSS is that run's)",
                "results": [runs[k] for k in sorted(runs)]}
            path.write_text(json.dumps(doc, indent=2) + "\n")  # after each size: a later one may not fit in time
        print(f"wrote {path}")
        return
    results = []
    for n in a.sizes:
        load = os.getloadavg()
        out = subprocess.run([sys.executable, __file__, "--worker", str(n)], capture_output=True, text=True,
                             check=True, env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))
        r = json.loads(out.stdout)
        r["load_avg_before"] = [round(x, 2) for x in load]
        results.append(r)
        recall = ", ".join(f"{k} {v['recall']:.3f}" for k, v in r["per_band"].items())
        print(f"n={n}: {r['seconds']} s ({r['questions_per_s']} q/s), peak RSS {r['peak_rss_mb']} MB, "
              f"load {r['load_avg_before']}; recall per band: {recall}", flush=True)
    import numpy
    doc = {"bench": "synth_scale", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "python": platform.python_version(), "numpy": numpy.__version__, "threads": 1, "results": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
