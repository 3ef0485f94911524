"""fastmath.fsio: atomic files, whole-line appends, the free-space check and the fault injector itself."""
import errno
import json

import pytest
import torch

from fastmath import fsio


def test_fault_injector_fails_after_n_bytes_and_at_the_kth_call(tmp_path):
    inside, outside = tmp_path / "fs", tmp_path / "other"
    inside.mkdir()
    outside.mkdir()
    with fsio.fail_writes(inside, after_bytes=10) as b:
        (outside / "x").write_text("y" * 100)  # not under root: untouched
        with open(inside / "a", "wb") as f:
            f.write(b"123456")
            with pytest.raises(OSError) as e:
                f.write(b"abcdef")
        assert e.value.errno == errno.ENOSPC and b.tripped == str(inside / "a")
        with pytest.raises(OSError):  # a full disk stays full
            (inside / "b").write_text("z")
    assert (inside / "a").read_bytes() == b"123456abcd"  # what fitted was written, like a real disk
    assert (outside / "x").read_text() == "y" * 100
    with fsio.fail_writes(inside, at_call=3, err=errno.EIO) as b:
        with open(inside / "c", "w") as f:
            f.write("1")
            f.write("2")
            with pytest.raises(OSError) as e:
                f.write("3")
    assert e.value.errno == errno.EIO and b.calls == 3
    with open(inside / "d", "w") as f:  # the patch is gone
        f.write("ok")


@pytest.mark.parametrize("fault", [{"after_bytes": 5}, {"at_call": 1, "err": errno.EIO}], ids=["enospc", "eio"])
def test_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, fault):
    path = tmp_path / "summary.json"
    fsio.atomic_write_json(path, {"old": 1})
    with fsio.fail_writes(tmp_path, **fault):
        with pytest.raises(fsio.StorageError) as e:
            fsio.atomic_write_json(path, {"new": list(range(100))}, hint="rerun it")
    msg = str(e.value)
    why = "no space left on device" if "after_bytes" in fault else "input/output error"
    assert msg == f"could not write {path}: {why}; rerun it"
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_atomic_open_passes_other_errors_through(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with fsio.atomic_open(tmp_path / "f", "w") as f:
            f.write("x")
            1 / 0
    assert list(tmp_path.iterdir()) == []


def test_append_file_never_leaves_a_torn_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    with fsio.fail_writes(tmp_path, after_bytes=30):
        f = fsio.AppendFile(path, fsync=True)
        f.append('{"a": 1}\n')
        f.append('{"b": 2}\n')
        with pytest.raises(fsio.StorageError, match="no space left on device"):
            f.append('{"c": "a line longer than what is left"}\n')
        f.close()
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'


def test_check_free_names_needed_free_and_where(tmp_path):
    free = fsio.free_bytes(tmp_path / "not" / "yet")  # the nearest existing parent answers
    fsio.check_free(tmp_path, 1000, "a small file")
    with pytest.raises(fsio.StorageError) as e:
        fsio.check_free(tmp_path, free + 10**9, "the checkpoint of step 7", "the last good one is step_5")
    msg = str(e.value)
    assert msg.startswith("the checkpoint of step 7 needs about ") and f"free on the file system of {tmp_path}" in msg
    assert msg.endswith("; the last good one is step_5") and "\n" not in msg


def test_storage_cause_sees_through_wrappers():
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    disk = OSError(errno.ENOSPC, "No space left on device", "/x")
    try:
        raise disk
    except OSError as e:
        wrapped = CheckpointException("save failed", {0: _wrap_exception(e)})
    assert fsio.storage_cause(wrapped) is disk and fsio.reason(wrapped) == "no space left on device"
    native = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 466")
    assert fsio.storage_cause(native) is native and "cut short" in fsio.reason(native)
    try:  # a native message over a real OSError: the OSError's errno wins
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as e:
            raise RuntimeError("unexpected pos 1 vs 0") from e
    except RuntimeError as e:
        assert fsio.reason(e) == "input/output error"
    assert fsio.storage_cause(ValueError("bad value")) is None
    assert fsio.storage_cause(OSError(errno.EACCES, "Permission denied")) is None


def test_safetensors_writer_gives_the_official_bytes(tmp_path):
    """checkpoint.write_safetensors writes through Python files (so faults reach it); its bytes are the
    safetensors library's own."""
    from safetensors.torch import load_file, save_file

    from fastmath.checkpoint import write_safetensors

    g = torch.Generator().manual_seed(0)
    t = {"b.weight": torch.randn(3, 5, generator=g).bfloat16(), "a": torch.randn(7, generator=g),
         "z": torch.arange(4), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.0)}
    write_safetensors(tmp_path / "ours.safetensors", t, {"format": "pt"})
    save_file(t, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    back = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(back[k], t[k]) for k in t)


def test_cli_turns_a_storage_error_into_one_sentence(tmp_path):
    """fastmath's command group prints a StorageError (and a raw ENOSPC OSError) as `Error: <sentence>`."""
    import click
    from click.testing import CliRunner

    from fastmath import cli

    @click.command()
    @click.option("--raw", is_flag=True)
    def boom(raw):
        if raw:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f"))
        raise fsio.StorageError("could not write x: no space left on device")

    cli.COMMANDS["boom"] = ("tests.nonexistent", "test")
    try:
        orig = cli.LazyGroup.get_command
        cli.LazyGroup.get_command = lambda self, ctx, name: boom if name == "boom" else orig(self, ctx, name)
        for args, want in ((["boom"], "could not write x: no space left on device"),
                           (["boom", "--raw"], f"{tmp_path / 'f'}: no space left on device")):
            r = CliRunner().invoke(cli.main, args)
            assert r.exit_code == 1 and r.output == f"Error: {want}\n", r.output
    finally:
        cli.LazyGroup.get_command = orig
        del cli.COMMANDS["boom"]
