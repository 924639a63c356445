"""Every path a command reads or writes, checked before any work; and how outputs are published.

The rules are the README's, "What every command ... guarantees about files": ``plan_paths``
checks them, ``staging`` and ``publish`` write a file under its final name beside the target
and move it into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from bnfold.errors import LoadError, SaveError, UsageError

#: Errors of ``os.link`` that mean "this filesystem has no hard links here", not "name taken".
_NO_HARD_LINKS = {errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_SPECIAL_FILES = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
}


@dataclass(frozen=True)
class NamedPath:
    """A path and the option or argument that named it (``MODEL``, ``--data``, ``--json``...)."""

    role: str
    path: Path
    written: bool = True  # for outputs: False when it is only named (a dry run writes no model)
    makes_parent: bool = False  # for outputs: the command creates its directory if missing

    def __str__(self) -> str:
        return f"{self.path} ({self.role})"


def spec_path(spec: str | os.PathLike[str] | None) -> Path | None:
    """The file or folder a MODEL or DATA argument names, or None when it names code
    (``package.module:callable``) or nothing. ``file.npz:NAME`` names ``file.npz``."""
    if spec is None:
        return None
    text = os.fspath(spec)
    path = Path(text)
    if os.path.lexists(path):
        return path
    head, colon, _ = text.rpartition(":")
    if colon and head and os.path.isfile(head):
        return Path(head)
    return None


def refuse_special_file(path: Path, what: str) -> None:
    """Refuse an input that exists but is neither a regular file nor a folder (a FIFO, a device,
    a socket): reading one may block forever or never end. A missing path is the caller's."""
    status = _stat(path)
    if status is not None and not (stat.S_ISREG(status.st_mode) or stat.S_ISDIR(status.st_mode)):
        raise LoadError(
            f"{path} is not a regular file (a FIFO, device or socket): bnfold reads {what} "
            "from files only; save it to a file first"
        )


def describe_broken_link(text: str) -> str:
    """Why the symbolic link ``text`` leads to no file: a loop, or a missing target."""
    try:
        os.stat(text)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return (
                f"{text}: symbolic link loop (following it leads back to itself); point the "
                "link at the file"
            )
    return f"{text}: a symbolic link to {os.readlink(text)}, which does not exist"


def plan_paths(
    inputs: Iterable[NamedPath], outputs: Iterable[NamedPath], *, overwrite: bool
) -> None:
    """Check every output against every input and every other output: an output may not be an
    input (even with ``overwrite``), lie inside an input folder, be another output, a directory
    or a special file, or exist (a link counts) unless ``overwrite``. Raises ``UsageError``
    (one line naming both paths and what to do). An output that is only named
    (``written=False``, e.g. a dry run's model) is checked for everything but existence."""
    inputs, outputs = tuple(inputs), tuple(outputs)
    for index, output in enumerate(outputs):  # first what --force cannot fix
        _check_place(output)
        for source in inputs:
            _check_not_input(output, source)
        for earlier in outputs[:index]:
            if _same(output.path, earlier.path):
                raise UsageError(
                    f"{output} and {earlier} are the same file; give each output its own path"
                )
    for output in outputs:
        problem = _existing(output.path, overwrite=overwrite)
        if problem and output.written:
            raise UsageError(f"{output}: {problem}")


def _check_place(output: NamedPath) -> None:
    path = output.path
    parent = path.parent
    if not parent.is_dir() and not (output.makes_parent and not os.path.lexists(parent)):
        what = "is not a directory" if os.path.lexists(parent) else "does not exist"
        raise UsageError(f"cannot write {output}: the directory {parent} {what}")
    if path.is_dir():
        raise UsageError(f"cannot write {output}: it is a directory; give a file name")
    mode = getattr(_stat(path), "st_mode", None)
    if mode is not None and not stat.S_ISREG(mode):
        kind = _SPECIAL_FILES.get(stat.S_IFMT(mode), "a special file")
        raise UsageError(
            f"cannot write {output}: it is {kind}, not a regular file; bnfold writes only "
            "regular files (use '-' for stdout where the option allows it)"
        )
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {output}: the directory {parent} is not writable")


def _check_not_input(output: NamedPath, source: NamedPath) -> None:
    if _same(output.path, source.path):
        raise UsageError(
            f"{output} is the same file as the input {source}; bnfold never overwrites its "
            "input, even with --force: choose another output path"
        )
    folder = source.path
    if folder.is_dir() and _inside(output.path, folder):
        raise UsageError(
            f"{output} is inside the input folder {source}: it would be read as input on the "
            "next run; write it elsewhere"
        )


def _existing(path: Path, *, overwrite: bool) -> str | None:
    """Why an output may not be written without ``overwrite`` (None when it may)."""
    if not os.path.lexists(path) or overwrite:
        return None
    if path.is_symlink():
        target = os.readlink(path)
        if not path.exists():
            return (
                f"is a symbolic link to {target}, which does not exist; bnfold never writes "
                "through a link: pass --force to replace the link itself with the file, or "
                "remove the link"
            )
        return (
            f"already exists (a symbolic link to {target}); pass --force to replace the link "
            "itself (its target is left alone)"
        )
    return "already exists; pass --force to overwrite it"


def _same(a: Path, b: Path) -> bool:
    """The same file: equal after resolving links and ``..``, or the same device and inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    first, second = _stat(a), _stat(b)
    return None not in (first, second) and os.path.samestat(first, second)


def _inside(path: Path, folder: Path) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real.startswith(root.rstrip(os.sep) + os.sep)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def staging(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A private temporary directory beside ``target``; yields ``target``'s name inside it.

    The directory (``.<name>.<random>.tmp``) and everything in it are removed on exit, whatever
    happens. Raises ``SaveError`` when it cannot be created.
    """
    out = Path(target)
    try:
        folder = tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        raise SaveError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        yield Path(folder) / out.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


#: What ``publish`` runs first in this context (``stop_check``).
_STOP_CHECK: ContextVar[Callable[[], None] | None] = ContextVar("bnfold_stop_check", default=None)


@contextlib.contextmanager
def stop_check(check: Callable[[], None]) -> Iterator[None]:
    """In this context, ``check()`` runs before each output is put in place (``publish``); what
    it raises leaves the target as it was. The CLI raises there for a stop signal whose
    exception code on the way caught and dropped."""
    token = _STOP_CHECK.set(check)
    try:
        yield
    finally:
        _STOP_CHECK.reset(token)


def publish(
    staged: str | os.PathLike[str], target: str | os.PathLike[str], *, overwrite: bool
) -> None:
    """Flush ``staged`` to disk and move it onto ``target`` (in the same directory).

    With ``overwrite``: ``os.replace`` (a link at ``target`` is replaced, not followed).
    Without: an exclusive hard link (on a filesystem without them, an exclusive create that
    reserves the name, then a replace), so a file that appeared at ``target`` after the checks
    is kept and ``UsageError`` says so. ``staged`` is gone afterwards when this returns. The
    context's ``stop_check`` runs first; the file gets the permissions of a new file (umask).
    """
    check = _STOP_CHECK.get()
    if check is not None:
        check()
    source, out = os.fspath(staged), os.fspath(target)
    _as_created(source)
    with open(source, "rb") as handle:
        os.fsync(handle.fileno())
    if overwrite:
        os.replace(source, out)
        return
    try:
        os.link(source, out)
    except FileExistsError:
        raise _appeared(out) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        _reserve(out)
        os.replace(source, out)
        return
    os.unlink(source)


def _as_created(path: str) -> None:
    """Give ``path`` the permissions a new file gets here (0666 less the umask), as most writers
    leave them: some (safetensors) create their file owner-only. Best effort: a filesystem that
    refuses (a network mount without modes) keeps the writer's."""
    probe = f"{path}.mode"
    try:
        handle = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            mode = stat.S_IMODE(os.fstat(handle).st_mode)
        finally:
            os.close(handle)
            os.unlink(probe)
        os.chmod(path, mode)
    except OSError:
        return


def _reserve(target: str) -> None:
    try:
        handle = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise _appeared(target) from None
    os.close(handle)


def _appeared(target: str) -> UsageError:
    return UsageError(
        f"{target} appeared while bnfold ran; nothing was replaced. Rerun with --force "
        "(overwrite=True) to replace it"
    )
