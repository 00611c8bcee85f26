"""The output discipline of every command that writes files (maps, optimize, evaluate, images,
label, demo): what may be replaced, how a result is published, and what a write error says.

- An output is built in a hidden temporary beside its target (``.NAME.HOST-PID-RANDOM.partial``,
  same file system) and renamed into place, so the target always holds the old or the new
  complete output, never a mix. A directory replaces an existing one by an atomic exchange
  (Linux ``renameat2(RENAME_EXCHANGE)``), elsewhere by two renames whose interruption the next
  run repairs.
- An existing target is replaced only when it is recognisably an output of the same command
  (a marker file ``.ovstore-output.json`` in directories, the file's own content for ``.npy``
  maps and token files) and the caller allows it (``--overwrite``, or a resumable command that
  resumes). A capture store, an input of the same run (the target equal to, inside or
  containing it) and a non-empty directory ovstore did not write are never replaced.
- Publishing holds a short lock beside the target, so concurrent writers of one output both
  succeed and the output is the complete result of the last one. Temporaries of killed runs
  are removed by the next writer of the same target.
- Every OSError while writing becomes one :class:`~ovstore.errors.OutputError` line naming the
  path, the reason and the fix (:func:`write_error`).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from ._version import __version__
from .errors import InvalidInputError, OutputError

__all__ = ["MARKER", "Output", "describe_os_error", "fix_for", "write_error", "os_errors", "open_output",
           "temporary_path", "zarr_marker", "is_capture_store", "remove_stale_temporaries", "held_lock", "write_marker",
           "publish_file_atomically", "pid_alive", "write_atomically", "write_text_atomic",
           "write_json_atomic"]

MARKER = ".ovstore-output.json"
PARTIAL = ".partial"
_OLD = ".old"

# ---------------------------------------------------------------------- write errors
_REASONS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EDQUOT: "the disk quota is exceeded", errno.EFBIG: "the file is too large for this file system",
            errno.ENOTDIR: "a file is in the way where a folder should be",
            errno.EISDIR: "a folder is in the way where a file should be",
            errno.EEXIST: "a file or folder is in the way", errno.ENOTEMPTY: "a folder is in the way"}

_FIXES = {errno.ENOSPC: "free space (or choose an --out on another disk)",
          errno.EDQUOT: "free space (or choose an --out on another disk)",
          errno.EROFS: "choose an --out on a writable file system",
          errno.EACCES: "fix the folder's permissions or choose another --out",
          errno.EPERM: "fix the folder's permissions or choose another --out",
          errno.EFBIG: "choose an --out on a file system that allows large files",
          errno.ENOTDIR: "move the file that is in the way or choose another --out",
          errno.EISDIR: "move the folder that is in the way or choose another --out",
          errno.EEXIST: "move what is in the way or choose another --out",
          errno.ENOTEMPTY: "move what is in the way or choose another --out"}


def describe_os_error(exc: OSError) -> str:
    """``the disk is full``, ``the file system is read-only``, ... for an OSError (for one-line
    errors of every command that writes files)."""
    return _REASONS.get(exc.errno, exc.strerror or str(exc))


def fix_for(exc: OSError) -> str:
    """What to do about a failed write, e.g. ``free space (or choose an --out on another disk)``."""
    return _FIXES.get(exc.errno, "fix the problem or choose another --out")


def write_error(path: str | Path, exc: OSError, *, kept: str = "nothing was written there",
                then: str = "run the same command again") -> OutputError:
    """The one-line error of a failed write: path, reason, what was kept, fix, next step."""
    where = exc.filename if isinstance(exc.filename, str) and exc.errno in (errno.ENOTDIR, errno.EISDIR,
                                                                            errno.EEXIST) else None
    fix = fix_for(exc)
    return OutputError(f"cannot write {path}: {describe_os_error(exc)}"
                       + (f" ({where})" if where and where != str(path) else "")
                       + f"; {kept}. {fix[0].upper()}{fix[1:]}, then {then}")


@contextlib.contextmanager
def os_errors(path: str | Path, *, kept: str | Callable[[], str] = "nothing was written there",
              then: str = "run the same command again") -> Iterator[None]:
    """Turn an OSError raised inside into :func:`write_error` (``kept`` may be computed late)."""
    try:
        yield
    except OSError as exc:
        raise write_error(path, exc, kept=kept() if callable(kept) else kept, then=then) from exc


# ---------------------------------------------------------------------- recognition
def is_capture_store(path: Path) -> bool:
    """A directory whose ``zarr.json`` carries ovstore's store attributes."""
    meta = path / "zarr.json"
    try:
        if not meta.is_file():
            return False
        return "ovstore" in json.loads(meta.read_text(encoding="utf-8")).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return meta.is_file()  # unreadable metadata of a would-be store: never replaced either


def read_marker(path: Path) -> dict | None:
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(folder: Path, command: str, **extra: object) -> None:
    """Mark ``folder`` as an output of ``ovstore COMMAND`` (what makes it replaceable)."""
    info = {"command": command, "ovstore_version": __version__,
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra}
    (folder / MARKER).write_text(json.dumps(info, indent=1, sort_keys=True), encoding="utf-8")


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a hidden temporary beside ``path`` (:func:`temporary_path`), then
    rename it over ``path``: readers and a killed writer leave the old file or the new one,
    never a part (the temporary is removed on any error)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a hidden temporary renamed over it: readers see the
    old file or the new one, never a part."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    """:func:`write_text_atomic` of ``data`` as JSON (sorted keys)."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def _visible(folder: Path) -> list[str]:
    return [e.name for e in os.scandir(folder) if e.name != MARKER]


def _is_npy_maps(path: Path) -> bool:
    """A ``.npy`` file as ``ovstore maps`` writes it: float32, four dimensions."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (OSError, ValueError):
        return False
    return dtype == np.float32 and len(shape) == 4


def _is_token(path: Path) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            return (f.metadata() or {}).get("format") == "ovstore-token"
    except Exception:  # any unreadable file is not a token
        return False


_OVERLAY = re.compile(r"\d{5}_p\d{3}(_t\d{2}_.+)?\.png$")

#: Content checks of folders written before the marker existed, by command.
_LEGACY_DIRS: dict[str, Callable[[Path], bool]] = {
    "maps": lambda p: (p / "ovam_maps" / "zarr.json").is_file(),
    "maps --png": lambda p: all(_OVERLAY.match(n) for n in _visible(p)),
    "images": lambda p: all(re.fullmatch(r"\d{5}\.png", n) for n in _visible(p)),
    "evaluate": lambda p: set(_visible(p)) <= {"report.json", "report.md", "report.png"},
    "optimize": lambda p: all(n.endswith(".safetensors") and _is_token(p / n) for n in _visible(p)),
    "label": lambda p: (p / "ovstore-label.json").is_file(),
    "demo": lambda p: set(_visible(p)) <= {"captures.zarr", "prompt_words", "open_vocabulary", "token",
                                           "circle.safetensors", "dataset", "report.md"},
}

_FILE_KINDS: dict[str, Callable[[Path], bool]] = {".npy": _is_npy_maps, ".safetensors": _is_token}


def zarr_marker(command: str) -> dict:
    """The root attribute that marks a Zarr output (no marker file: Zarr readers would warn)."""
    return {"ovstore_output": {"command": command, "ovstore_version": __version__}}


def _zarr_command(path: Path) -> str | None:
    try:
        attrs = json.loads((path / "zarr.json").read_text(encoding="utf-8")).get("attributes", {})
        return attrs.get("ovstore_output", {}).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def _written_by(path: Path, command: str) -> bool:
    if path.is_dir():
        if _zarr_command(path) is not None:
            return _zarr_command(path) == command
        marker = read_marker(path)
        if marker is not None:
            return marker.get("command") == command
        legacy = _LEGACY_DIRS.get(command)
        return bool(legacy and _visible(path) and legacy(path))
    check = _FILE_KINDS.get(path.suffix)
    return bool(check and check(path))


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


# ---------------------------------------------------------------------- temporaries and locks
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def temporary_path(path: str | Path, tag: str = "") -> Path:
    """A hidden temporary beside ``path``, unique to this writer: ``.NAME.HOST-PID-RANDOM.partial``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{tag}{PARTIAL}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not): locks and temporaries of dead writers are stale."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: not alive
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries of ``path`` left by killed writers of this host (a live writer's
    are kept). An old output set aside by an interrupted replacement is put back if the
    target is missing."""
    path = Path(path)
    prefix = f".{path.name}."
    pattern = re.compile(re.escape(prefix) + r"(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}(?P<old>\.old)?"
                         + re.escape(PARTIAL) + "$")
    removed = []
    try:
        entries = [e for e in path.parent.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or match["host"] != _host() or pid_alive(int(match["pid"])):
            continue
        if match["old"] and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.rename(entry, path)
                continue
        _remove(entry)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def held_lock(path: str | Path, *, wait: float | None = 60.0, what: str = "output") -> Iterator[None]:
    """Hold the lock file ``.NAME.ovstore-lock`` beside ``path`` (``flock``: released by the
    kernel when a holder dies). ``wait=None`` refuses at once when another process holds it.
    The lock file is removed on release."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.ovstore-lock")
    deadline = time.monotonic() + (wait or 0)
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            if wait is None or time.monotonic() >= deadline:
                raise OutputError(f"{what} {path} is being written by {holder}; wait for it to finish or "
                                  "choose another --out") from None
            time.sleep(0.02)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed by its last holder: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


# ---------------------------------------------------------------------- publishing
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _replace_dir(tmp: Path, target: Path) -> None:
    """Put the folder ``tmp`` at ``target``, replacing what is there, never leaving a mix."""
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):  # tmp now holds the old output
        _remove(tmp)
        return
    old = temporary_path(target, _OLD)  # put back by remove_stale_temporaries if killed in between
    os.rename(target, old)
    os.rename(tmp, target)
    _remove(old)


def publish_file_atomically(tmp: Path, target: Path) -> None:
    """Rename a finished temporary file over ``target`` (atomic on POSIX)."""
    os.replace(tmp, target)


@dataclass
class Output:
    """A checked output path of one command (see :func:`open_output`)."""

    path: Path
    command: str
    kind: str  # "file" or "dir"
    replace: bool
    inputs: tuple[Path, ...] = ()
    option: str = "--out"
    _temporaries: list[Path] = field(default_factory=list)

    def check(self) -> None:
        """Refuse targets that must not be written (raises InvalidInputError)."""
        _check(self.path, self.command, self.kind, self.inputs, self.replace, self.option)

    def publish_dir(self, folder: Path) -> None:
        """Put the finished folder ``folder`` (beside the target) at the target, replacing
        what is there, never leaving a mix; call while holding the target's lock."""
        _replace_dir(folder, self.path)

    @contextlib.contextmanager
    def writing(self, *, kept: str | Callable[[], str] = "nothing was written there",
                then: str = "run the same command again", marker: dict | bool = True) -> Iterator[Path]:
        """A fresh temporary to build the output in; published over the target when the block
        ends without error, removed otherwise. OSErrors become one-line OutputErrors.
        A folder gets the marker file (``marker``: extra fields, or False for Zarr outputs,
        which carry :func:`zarr_marker` in their attributes)."""
        tmp = temporary_path(self.path)
        self._temporaries.append(tmp)
        try:
            with os_errors(self.path, kept=kept, then=then):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_temporaries(self.path)
                if self.kind == "dir":
                    tmp.mkdir()
                yield tmp
                if self.kind == "dir" and marker is not False:
                    write_marker(tmp, self.command, **(marker if isinstance(marker, dict) else {}))
                with held_lock(self.path):
                    self.check()  # again: another process may have put something there meanwhile
                    if self.kind == "dir":
                        _replace_dir(tmp, self.path)
                    else:
                        publish_file_atomically(tmp, self.path)
        finally:
            _remove(tmp)
            self._temporaries.remove(tmp)


def _check(path: Path, command: str, kind: str, inputs: Iterable[Path], replace: bool, option: str) -> None:
    for source in inputs:
        if _within(path, source) or _within(source, path):
            relation = "is" if path == source else ("is inside" if _within(path, source) else "contains")
            raise InvalidInputError(f"{option} {path} {relation} {source}, an input of this command; choose "
                                    f"{option} outside every input")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInputError(f"{option} {path}: {parent} is a file, not a folder; choose another {option}")
            break
    if not os.path.lexists(path):
        return
    if path.is_dir() and is_capture_store(path):
        raise InvalidInputError(f"{option} {path} is a capture store; `ovstore {command}` never replaces "
                                f"one, choose another {option}")
    if kind == "file" and path.is_dir():
        raise InvalidInputError(f"{option} {path} is a folder; give a file name, or move the folder")
    if kind == "dir" and not path.is_dir():
        raise InvalidInputError(f"{option} {path} is a file; give a folder, or move the file")
    if kind == "dir" and not _visible(path) and read_marker(path) is None:
        return  # an empty folder: used as it is
    if not _written_by(path, command):
        what = "a folder" if path.is_dir() else "a file"
        raise InvalidInputError(f"{option} {path} is {what} that `ovstore {command}` did not write; it is never "
                                f"replaced: choose another {option}, or move it away")
    if not replace:
        raise InvalidInputError(f"{option} {path} exists (written by `ovstore {command}`); add --overwrite to "
                                f"replace it, or choose another {option}")


def open_output(path: str | Path, command: str, *, kind: str, inputs: Iterable[str | Path] = (),
                overwrite: bool = False, resume: bool = False, option: str = "--out") -> Output:
    """Check ``path`` as the ``--out`` of ``ovstore COMMAND`` and return its :class:`Output`.

    ``kind`` is ``"file"`` or ``"dir"``; ``inputs`` are the paths this run reads; an existing
    output of the same command is replaced only with ``overwrite`` (or continued with
    ``resume`` by commands that resume). ``command`` names the kind of output (``"maps"``,
    ``"maps --png"``, ...); ``option`` is the option named in messages. Raises
    InvalidInputError before any work is done.
    """
    if kind not in ("file", "dir"):
        raise ValueError(kind)
    target = Path(os.path.abspath(path))
    target = target.parent.resolve() / target.name  # symlinked folders resolved, the name kept
    resolved = tuple(Path(p).resolve() for p in inputs if p is not None)
    output = Output(target, command, kind, overwrite or resume, resolved, option)
    output.check()
    return output
