"""A full disk or an I/O error in every writer: one sentence, no partial file a rerun would trust, and the
rerun (or --resume) gives what an uninterrupted run gives.

Faults are injected with fastmath.fsio.fail_writes (ENOSPC/EIO/ENOENT after N bytes or at the K-th write
call, chosen from the write log of a clean run); one test fills a real, small tmpfs where mounting is allowed.
"""
import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fastmath import data as D
from fastmath import fsio
from fastmath import train as T
from fastmath.cli import main
from fastmath.synth.procedural import SMALL_CONFIG, SMALL_SPEC, generate
from fastmath.tokenizer import train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_server import FakeOpenAI  # noqa: E402
from test_synth_server import KEY, read_jsonl, write_seeds  # noqa: E402

STEPS = 4
CFG = {"model": "test", "procedural": SMALL_SPEC, "procedural_examples": 400, "val_examples": 8, "eval_problems": 0,
       "micro_batch_tokens": 1024, "batch_tokens": 2048, "max_steps": STEPS, "save_every": 2, "save_minutes": 0}


def train_args(cfg: dict, out: Path) -> list[str]:
    args = ["train", "--out", str(out), "--threads", "1", "--no-progress"]
    for k, v in cfg.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


def one_sentence_error(r) -> str:
    """The failed command's message: exit 1, `Error: ...` on one line at the end, no traceback."""
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output, r.output
    last = r.output.rstrip("\n").splitlines()[-1]
    assert last.startswith("Error: "), r.output
    return last[len("Error: "):]


def no_temporaries(root: Path) -> None:
    left = [str(p) for p in root.rglob("*") if ".tmp" in p.name]
    assert not left, left


def losses(run: Path) -> dict:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["step"] not in out
            out[rec["step"]] = rec["loss"]
    return out


def same_weights(a: Path, b: Path) -> None:
    from fastmath.checkpoint import load_model

    wa, wb = load_model(a).state_dict(), load_model(b).state_dict()
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """An uninterrupted run, and the path of every write call it made."""
    root = tmp_path_factory.mktemp("diskfull")
    recs = generate(300, SMALL_CONFIG, seed=9)
    tok = root / "tok.model"
    train_tokenizer([D.render_prompt(r["question"]) for r in recs] + [r["solution"] for r in recs], tok, 400)
    cfg = {**CFG, "tokenizer": str(tok)}
    with fsio.fail_writes(root / "ref") as clean:
        r = CliRunner().invoke(main, train_args(cfg, root / "ref"))
    assert r.exit_code == 0, r.output
    return root, cfg, (root / "ref" / "latest").resolve(), clean.log


def first_call(log: list[str], *parts: str, after: int = 0) -> int:
    """1-based index of the first write call at or after `after` whose path contains every part."""
    return next(i + 1 for i, p in enumerate(log) if i >= after and all(s in p for s in parts))


def resume_and_compare(root, ref_run, run, extra=()):
    r = CliRunner().invoke(main, ["train", "--resume", str(run), "--threads", "1", "--save-every", "3",
                                  "--keep", "3", "--no-progress", *extra])
    assert r.exit_code == 0, r.output
    assert losses(run) == losses(ref_run)  # bitwise: CPU fp32
    same_weights(run / "final", ref_run / "final")
    no_temporaries(run)


# (name, how to find the failing call in the clean run's write log, errno, last good step after the fault)
TRAIN_FAULTS = [
    ("first-checkpoint-dcp", lambda log: dict(after_bytes=None, at_call=first_call(log, ".tmp_step_2", "dcp")),
     errno.ENOSPC, None),
    ("mid-safetensors", lambda log: dict(at_call=first_call(log, ".tmp_step_4", "model.safetensors") + 2),
     errno.EIO, 2),
    ("final-export", lambda log: dict(at_call=first_call(log, ".tmp_final", "model.safetensors")), errno.ENOENT, 4),
    ("summary", lambda log: dict(at_call=first_call(log, "summary.json")), errno.ENOSPC, 4),
]


@pytest.mark.parametrize("name,where,err,good", TRAIN_FAULTS, ids=[f[0] for f in TRAIN_FAULTS])
def test_train_write_fault_stops_cleanly_and_resumes_exactly(ref, name, where, err, good):
    root, cfg, ref_run, log = ref
    out = root / name
    with fsio.fail_writes(out, err=err, **where(log)) as b:
        r = CliRunner().invoke(main, train_args(cfg, out))
    assert b.tripped
    msg = one_sentence_error(r)
    run = (out / "latest").resolve()  # `latest` still names the run
    assert f"fastmath train --resume {run}" in msg, msg
    if good is None:
        assert "checkpoint of step 2" in msg and "no checkpoint was written yet" in msg, msg
    else:
        assert f"the last good checkpoint is {run / 'checkpoints' / f'step_{good}'}" in msg, msg
        assert T.list_checkpoints(run)[-1][0] == good
    if name == "mid-safetensors":
        assert msg.startswith(f"could not write the checkpoint of step 4 to {run / 'checkpoints'} "
                              "(input/output error); its partial files were removed"), msg
    no_temporaries(out)
    resume_and_compare(root, ref_run, run)


def test_train_refuses_a_checkpoint_that_cannot_fit(ref, monkeypatch):
    root, cfg, ref_run, _ = ref
    out = root / "refuse"
    real = fsio.free_bytes
    monkeypatch.setattr(fsio, "free_bytes", lambda p: 500_000 if "checkpoints" in str(p) else real(p))
    r = CliRunner().invoke(main, train_args(cfg, out))
    msg = one_sentence_error(r)
    run = (out / "latest").resolve()
    assert msg.startswith("the checkpoint of step 2 needs about ") and "but only 500.0 KB is free on the file " \
        f"system of {run / 'checkpoints'}; no checkpoint was written yet" in msg, msg
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    monkeypatch.undo()
    resume_and_compare(root, ref_run, run)


def test_resume_allows_resource_options_and_refuses_result_options(ref):
    root, cfg, ref_run, _ = ref
    r = CliRunner().invoke(main, ["train", "--resume", str(ref_run), "--lr", "0.1", "--threads", "2"])
    msg = one_sentence_error(r)
    assert msg.startswith("--resume continues a run exactly with its saved config, and --lr would change its "
                          "results; drop it"), msg
    with pytest.raises(ValueError, match="--seed, --max-steps would change"):
        T.check_resume_overrides({"seed": 1, "max_steps": 9, "keep": 1})
    T.check_resume_overrides({k: 1 for k in ("threads", "save_every", "save_minutes", "keep", "eval_every")})


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def test_train_on_a_real_full_filesystem(ref, monkeypatch):
    """A tmpfs with room for one checkpoint: the next is refused by the free-space check; with the check
    off the real write fails with ENOSPC; after the file system grows, --resume finishes the run exactly."""
    root, cfg, ref_run, _ = ref
    ckpt = sum(f.stat().st_size for f in (ref_run / "checkpoints" / "step_2").rglob("*") if f.is_file())
    mnt = root / "tmpfs"
    if not _mount_tmpfs(mnt, int(ckpt * 1.6) // 4096 * 4096):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        r = CliRunner().invoke(main, train_args(cfg, mnt))
        msg = one_sentence_error(r)
        run = (mnt / "latest").resolve()
        assert msg.startswith("the checkpoint of step 4 needs about ") and "is free on the file system of" in msg
        assert T.list_checkpoints(run)[-1][0] == 2
        monkeypatch.setattr(fsio, "check_free", lambda *a, **k: None)  # let the write itself hit the full disk
        r = CliRunner().invoke(main, ["train", "--resume", str(run), "--threads", "1", "--no-progress"])
        msg = one_sentence_error(r)
        assert "(no space left on device)" in msg or "cut short" in msg, msg
        assert f"the last good checkpoint is {run / 'checkpoints' / 'step_2'}" in msg
        no_temporaries(mnt)
        monkeypatch.undo()
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True, timeout=20)
        resume_and_compare(root, ref_run, run)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


# ----------------------------------------------------------------------------------------------------------
# fastmath sample and fastmath grade


def sample_args(run: Path, out: Path) -> list[str]:
    return ["sample", "--model", str(run), "--n", "4", "--problems", "5", "--max-new-tokens", "12", "--threads",
            "1", "--device", "cpu", "--out", str(out), "--greedy"]


@pytest.fixture(scope="module")
def sampled(ref):
    root, _, ref_run, _ = ref
    with fsio.fail_writes(root / "sample_ref") as clean:
        r = CliRunner().invoke(main, sample_args(ref_run, root / "sample_ref"))
    assert r.exit_code == 0, r.output
    return root, ref_run, root / "sample_ref", clean.log


SAMPLE_FAULTS = [("third-problem", ("samples.jsonl",), 3, errno.ENOSPC),
                 ("summary", ("summary.json",), 1, errno.EIO),
                 ("plot", ("pass_at_k.png",), 1, errno.ENOSPC)]


@pytest.mark.parametrize("name,parts,nth,err", SAMPLE_FAULTS, ids=[f[0] for f in SAMPLE_FAULTS])
def test_sample_write_fault_then_rerun_gives_the_same_samples(sampled, name, parts, nth, err):
    root, ref_run, ref_out, log = sampled
    hits = [i + 1 for i, p in enumerate(log) if all(s in p for s in parts)]
    out = root / f"sample_{name}"
    with fsio.fail_writes(out, at_call=hits[nth - 1], err=err) as b:
        r = CliRunner().invoke(main, sample_args(ref_run, out))
    assert b.tripped
    msg = one_sentence_error(r)
    assert msg.endswith("the problems finished so far are kept; free some space and rerun the same command to "
                        "resume"), msg
    no_temporaries(out)
    if name == "third-problem":
        assert len(read_jsonl(out / "samples.jsonl")) == 2  # whole lines only
        assert not (out / "summary.json").exists()
    r = CliRunner().invoke(main, sample_args(ref_run, out))
    assert r.exit_code == 0, r.output
    if name == "third-problem":
        assert "resuming" in r.output and "2 of 5 problems already sampled" in r.output
    assert read_jsonl(out / "samples.jsonl") == read_jsonl(ref_out / "samples.jsonl")
    want = json.loads((ref_out / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    timing = ("seconds", "tokens_per_second", "generated_tokens")
    assert {k: v for k, v in got.items() if k not in timing} == {k: v for k, v in want.items() if k not in timing}
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grade_write_fault_keeps_the_old_summary(sampled, tmp_path):
    _, _, ref_out, _ = sampled
    samples = tmp_path / "samples.jsonl"
    samples.write_bytes((ref_out / "samples.jsonl").read_bytes())
    (tmp_path / "summary.json").write_text('{"old": true}\n')
    with fsio.fail_writes(tmp_path, after_bytes=100):
        r = CliRunner().invoke(main, ["grade", str(samples), "--workers", "1"])
    assert one_sentence_error(r) == f"could not write {tmp_path / 'summary.json'}: no space left on device"
    assert (tmp_path / "summary.json").read_text() == '{"old": true}\n'
    no_temporaries(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# fastmath synth


def synth_args(seeds: Path, out: Path, url: str) -> list[str]:
    return ["synth", "--seeds", str(seeds), "--out", str(out), "--num-questions", "4", "--concurrency", "1",
            "--seed", "3", "--timeout", "10", "--no-progress", "--base-url", url]


@pytest.fixture(scope="module")
def synthesised(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    seeds = write_seeds(root / "seeds.jsonl", 40)
    with FakeOpenAI(api_key=KEY) as srv, fsio.fail_writes(root / "ref") as clean:
        (root / "ref").mkdir()
        r = CliRunner().invoke(main, synth_args(seeds, root / "ref" / "out.jsonl", srv.url),
                               env={"OPENAI_API_KEY": KEY})
    assert r.exit_code == 0, r.output
    return root, seeds, read_jsonl(root / "ref" / "out.jsonl"), clean.log


SYNTH_FAULTS = [("journal", "journal.jsonl", 4, errno.ENOSPC), ("records", "out.jsonl.tmp", 2, errno.EIO),
                ("report", "report.json", 1, errno.ENOSPC)]


@pytest.mark.parametrize("name,part,nth,err", SYNTH_FAULTS, ids=[f[0] for f in SYNTH_FAULTS])
def test_synth_write_fault_then_rerun_gives_the_same_records(synthesised, name, part, nth, err):
    root, seeds, want, log = synthesised
    hits = [i + 1 for i, p in enumerate(log) if p.endswith(part) or part in Path(p).name]
    out = root / name
    out.mkdir()
    with FakeOpenAI(api_key=KEY) as srv, fsio.fail_writes(out, at_call=hits[nth - 1], err=err) as b:
        r = CliRunner().invoke(main, synth_args(seeds, out / "out.jsonl", srv.url), env={"OPENAI_API_KEY": KEY})
        sent = len(srv.log)
    assert b.tripped
    msg = one_sentence_error(r)
    journaled = read_jsonl(out / "out.journal.jsonl")[1:]
    if name == "journal":
        # the 3rd reply (4th journal line after the header) was paid for but could not be saved: said so,
        # and no request was sent after it
        assert "stopped before sending more requests: 1 paid-for reply" in msg and "will be asked again" in msg
        assert sent == len(journaled) + 1 == 3, (sent, len(journaled))
    elif name == "records":
        assert msg.startswith(f"could not write {out / 'out.jsonl'}: input/output error; stopped before sending "
                              "more requests: every reply received is safe in the journal"), msg
    else:
        assert msg.endswith("the records are written; free some space and rerun the same command to write the "
                            "report"), msg
    no_temporaries(out)
    with FakeOpenAI(api_key=KEY) as srv:  # a fresh server: its replies depend only on what is asked
        r = CliRunner().invoke(main, synth_args(seeds, out / "out.jsonl", srv.url), env={"OPENAI_API_KEY": KEY})
    assert r.exit_code == 0, r.output
    assert read_jsonl(out / "out.jsonl") == want
    assert json.loads((out / "out.report.json").read_text())["kept"] == 4


# ----------------------------------------------------------------------------------------------------------
# the tokenization cache


def test_failed_cache_write_falls_back_to_no_cache(ref, tmp_path, capsys):
    root, _, _, _ = ref
    from fastmath.tokenizer import Tokenizer

    tok = Tokenizer(root / "tok.model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate(30, SMALL_CONFIG, seed=2)))
    want, _ = D.load_tokenized(data, tok, cache_dir="", progress=False)
    cache = tmp_path / "cache"
    for fault in ({"after_bytes": 2000}, {"at_call": 1, "err": errno.EIO}):
        with fsio.fail_writes(cache, **fault) as b:
            docs, hit = D.load_tokenized(data, tok, cache_dir=cache, progress=False)
        assert b.tripped and not hit
        assert (docs.tokens == want.tokens).all() and (docs.offsets == want.offsets).all()
        assert list(cache.iterdir()) == []  # nothing a later run would read
        assert "warning: tokenization cache not written" in capsys.readouterr().err
    docs, hit = D.load_tokenized(data, tok, cache_dir=cache, progress=False)  # space again: cached as usual
    assert not hit and D.load_tokenized(data, tok, cache_dir=cache, progress=False)[1]
