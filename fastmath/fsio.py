"""Writing files so that a full disk or an I/O error costs nothing already saved. No torch here.

Every fastmath writer goes through this module (or through plain `open`, which the fault injector below
also covers):

- `atomic_open` / `atomic_write` / `atomic_write_json`: write a temporary file beside the target, fsync it,
  rename it over the target and fsync the directory. A reader sees the old file or the new one, never a
  half-written one; a failed write removes its temporary file.
- `AppendFile`: one JSONL line at a time (journals, samples, metrics). A line that cannot be written whole
  is cut off again, so the file ends on a complete line; `fsync=True` makes each line durable before the
  caller acts on it (a paid-for API reply is on disk before it is parsed).
- `check_free`: compare what a write needs with the free space first, and refuse early.
- `StorageError`: the one sentence a user reads (what could not be written, where, why, what to do);
  `fastmath`'s command line prints it without a traceback and exits non-zero.
- `fail_writes`: for tests, make writes under a directory fail with ENOSPC/EIO/... after N bytes or at the
  K-th write call, by patching `open` (which pathlib, torch.distributed.checkpoint, numpy and matplotlib
  all go through), instead of filling a real disk.
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import shutil
from pathlib import Path

# errno values that mean "the storage failed us", not "the program is wrong": these become one sentence.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.ENOENT, errno.ENOTDIR,
                  errno.ESTALE, errno.ENXIO}
# What the native writers (torch's zip writer, safetensors in Rust) say when the OS refused a write.
_NATIVE_HINTS = ("no space left", "os error 28", "input/output error", "os error 5", "disk quota",
                 "read-only file system", "unexpected pos", "file write failed")


class StorageError(RuntimeError):
    """A write that failed or would not fit; str(e) is one sentence for the user (no traceback needed)."""


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _chain(exc: BaseException | None):
    """exc, its causes/contexts, and the per-rank failures torch.distributed.checkpoint wraps (depth first)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        failures = getattr(exc, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            for pair in failures.values():
                yield from _chain(pair[0] if isinstance(pair, tuple) else pair)
        exc = exc.__cause__ or exc.__context__


def storage_cause(exc: BaseException | None) -> BaseException | None:
    """The storage failure behind `exc`, or None when `exc` is not about storage: a StorageError or an
    OSError with a storage errno anywhere in its chain, else a native writer's message that says so."""
    for e in _chain(exc):
        if isinstance(e, StorageError) or (isinstance(e, OSError) and e.errno in STORAGE_ERRNOS):
            return e
    for e in _chain(exc):
        if isinstance(e, (RuntimeError, OSError)) and any(h in str(e).lower() for h in _NATIVE_HINTS):
            return e
    return None


def reason(exc: BaseException) -> str:
    """'no space left on device' for ENOSPC, and so on; a short text for anything else."""
    cause = storage_cause(exc) or exc
    if isinstance(cause, StorageError):
        return str(cause)
    if isinstance(cause, OSError) and cause.errno is not None:
        return (cause.strerror or os.strerror(cause.errno)).lower()
    if "unexpected pos" in str(cause):  # torch's zip writer: the OS error under it was swallowed
        return "a write was cut short (is the disk full or failing?)"
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return text[:200]


def write_failed(path, exc: BaseException, what: str = "", hint: str = "") -> StorageError:
    """The StorageError for a failed write of `path`: 'could not write [what ]path: why[; hint]'
    (a StorageError passes through unchanged)."""
    if isinstance(exc, StorageError):
        return exc
    return StorageError(f"could not write {what + ' ' if what else ''}{path}: {reason(exc)}{'; ' + hint if hint else ''}")


def free_bytes(path) -> int:
    """Free bytes (for an unprivileged user) on the file system holding `path` or its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free(path, needed: int, what: str, hint: str = "") -> None:
    """Raise StorageError (needed, free, where) unless `needed` bytes fit on the file system of `path`.

    A 1 MB margin is kept: file system metadata and the small files beside the big ones need room too.
    """
    free = free_bytes(path)
    if needed + 2**20 > free:
        raise StorageError(f"{what} needs about {human_bytes(needed)} but only {human_bytes(free)} is free on "
                           f"the file system of {path}{'; ' + hint if hint else ''}")


def fsync_dir(path) -> None:
    """Make a rename or a new file in `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", encoding: str | None = "utf-8", what: str = "", hint: str = ""):
    """`with atomic_open(p, "wb") as f: ...` writes p all at once or not at all.

    On success the temporary file is fsynced and renamed over `path`; on any error it is removed, and a
    storage error (ENOSPC, EIO, a vanished directory, ...) becomes a StorageError naming `path`.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    f = None
    try:
        f = open(tmp, mode, encoding=None if "b" in mode else encoding)
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        if storage_cause(e) is not None:
            raise write_failed(path, e, what, hint) from None
        raise


def atomic_write(path, data: str | bytes, what: str = "", hint: str = "") -> None:
    """Replace `path` with `data` atomically (see atomic_open)."""
    mode = "wb" if isinstance(data, (bytes, bytearray, memoryview)) else "w"
    with atomic_open(path, mode, what=what, hint=hint) as f:
        f.write(data)


def atomic_write_json(path, obj, indent: int | None = 2, what: str = "", hint: str = "") -> None:
    atomic_write(path, json.dumps(obj, indent=indent) + "\n", what=what, hint=hint)


def copy_file(src, dst, chunk: int = 1 << 20) -> None:
    """Copy with plain reads and writes (no sendfile), so a failure surfaces as an OSError of `dst`."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for block in iter(lambda: fin.read(chunk), b""):
            fout.write(block)


class AppendFile:
    """Append whole lines to a text file (JSONL): each line is written completely or not at all.

    Unbuffered, so nothing waits in memory to fail later at close; on a failed write the file is cut back
    to its previous length (best effort: a later reader still drops a torn last line) and a StorageError
    is raised. `fsync=True` syncs every line before `append` returns.
    """

    def __init__(self, path, fsync: bool = False, what: str = "", hint: str = ""):
        self.path, self.fsync, self.what, self.hint = Path(path), fsync, what, hint
        try:
            self._f = open(self.path, "ab", buffering=0)
        except OSError as e:
            if storage_cause(e) is not None:
                raise write_failed(self.path, e, what, hint) from None
            raise

    def append(self, line: str) -> None:
        data = line.encode("utf-8")
        start = os.fstat(self._f.fileno()).st_size
        try:
            view, done = memoryview(data), 0
            while done < len(data):
                n = self._f.write(view[done:])
                done += n if n is not None else 0
            if self.fsync:
                os.fsync(self._f.fileno())
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._f.fileno(), start)
            raise write_failed(self.path, e, self.what, self.hint) from None

    def write(self, text: str) -> None:  # file-like spelling, for code that writes a line at a time
        self.append(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Fault injection (tests)


class _Budget:
    def __init__(self, after_bytes, at_call, err):
        self.after_bytes, self.at_call, self.err = after_bytes, at_call, err
        self.bytes = 0
        self.calls = 0
        self.tripped = None  # the path of the first write that failed
        self.log = []  # the path of every write call, in order (tests pick the K-th call by file)

    def fail(self, name):
        self.tripped = self.tripped or name
        raise OSError(self.err, os.strerror(self.err), str(name))


class _FaultyFile:
    """A write-mode file whose writes draw on a shared budget; everything else is the real file's."""

    def __init__(self, f, name, budget: _Budget):
        self._f, self._name, self._budget = f, name, budget

    def write(self, data):
        b = self._budget
        b.calls += 1
        b.log.append(self._name)
        if b.tripped or (b.at_call is not None and b.calls >= b.at_call):
            b.fail(self._name)
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if b.after_bytes is not None and b.bytes + size > b.after_bytes:
            room = max(0, b.after_bytes - b.bytes)
            if room:  # a real full disk takes what fits first
                self._f.write(data[:room] if isinstance(data, str) else memoryview(data).cast("B")[:room])
                b.bytes += room
            b.fail(self._name)
        b.bytes += size
        return self._f.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@contextlib.contextmanager
def fail_writes(root, after_bytes: int | None = None, at_call: int | None = None, err: int = errno.ENOSPC):
    """Make writes to files under `root` fail like a full (ENOSPC) or failing (EIO) disk.

    Args:
        root: only files opened for writing below this directory are affected.
        after_bytes: the first write that would pass this many bytes in all writes the first bytes that
            fit, then raises OSError(err); later writes fail too (a full disk stays full).
        at_call: the K-th write call (1-based, counted over all files under root) and every later one fail.
        err: errno.ENOSPC, errno.EIO, errno.ENOENT (a vanished directory), ...
    Yields:
        the budget: .bytes and .calls written so far, .log = the path of each write call, .tripped = the
        path of the first failed write or None. With neither limit set nothing fails, which maps the writes
        of a clean run (to choose where to fail the next one).
    """
    root = os.path.abspath(root)
    budget = _Budget(after_bytes, at_call, err)
    real_open = builtins.open

    def faulty_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            name = os.path.abspath(os.fspath(file))
            if name == root or name.startswith(root + os.sep):
                return _FaultyFile(f, name, budget)
        return f

    saved = (builtins.open, io.open)
    builtins.open = io.open = faulty_open
    try:
        yield budget
    finally:
        builtins.open, io.open = saved
