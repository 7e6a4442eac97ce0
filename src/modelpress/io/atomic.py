"""Atomic folder writes and their recovery.

A save writes into a hidden sibling `.NAME.tmp-PID-HEX`, then renames it to NAME. Replacing an existing folder
takes two renames: NAME -> `.NAME.old-PID-HEX/x`, then the new folder -> NAME, then the old copy is deleted.
A process killed on the way leaves these hidden folders behind; `recover(NAME)` (run by every save and load)
deletes those of processes that are no longer running and, when a kill fell between the two renames (NAME
missing), renames the previous copy back, so NAME is always the old or the new complete folder.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path

LEGACY = r"[a-z0-9_]{8}"  # mkdtemp names of earlier versions (no process id)
INPLACE_TMP = ".modelpress.tmp-"  # inside an empty target whose parent is read-only


def real(path: "str | os.PathLike") -> Path:
    """The path with symlinks resolved: a symlinked folder keeps its link, its target is written."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def new_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder `prefix + PID-HEX` in `parent`, created with the user's umask (not mkdtemp's 0700)."""
    for _ in range(100):
        d = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(d, 0o777)
            return d
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary folder in {parent}")


def umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


def usual_mode(f: Path) -> None:
    """Give a written file the mode a plain open() would (0666 less the umask): safetensors writes 0600."""
    os.chmod(f, 0o666 & ~umask())


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # no harmless liveness probe: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _stale(entry: str, prefix: str) -> bool:
    m = re.fullmatch(re.escape(prefix) + rf"(?:(\d+)-[0-9a-f]+|{LEGACY})", entry)
    return m is not None and (m.group(1) is None or not _alive(int(m.group(1))))


def leftovers(path: Path) -> list[Path]:
    """Hidden folders an interrupted save of `path` left behind (of processes no longer running)."""
    out = []
    try:
        entries = os.listdir(path.parent)
    except OSError:
        entries = []
    for e in entries:
        if _stale(e, f".{path.name}.tmp-") or _stale(e, f".{path.name}.old-"):
            out.append(path.parent / e)
    if path.is_dir() and not path.is_symlink():
        try:
            out += [path / e for e in os.listdir(path) if _stale(e, INPLACE_TMP)]
        except OSError:
            pass
    return sorted(out)


def recover(path: Path) -> None:
    """Bring back the previous copy of `path` if a save was killed between its two renames, and delete what
    killed saves left behind. Best effort: without write access nothing changes (load still reports it)."""
    for d in leftovers(path):
        try:
            if d.name.startswith(f".{path.name}.old-") and (d / "x").is_dir() and not os.path.lexists(path):
                os.replace(d / "x", path)
            shutil.rmtree(d)
        except OSError:
            pass


def missing_hint(path: Path) -> str:
    """For a missing `path`: where an interrupted save left its previous copy, if anywhere."""
    old = [d for d in leftovers(path) if (d / "x").is_dir()]
    return f"; an interrupted save left its previous copy in {old[0] / 'x'}" if old else ""


def fsync_dir(d: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def writable(d: Path, probe: str | None = None) -> bool:
    """Whether folders can be created in `d`: the permission check, then, given a name prefix, a real probe
    (right also for root on special file systems); a probe named like the save's own temporary folder is
    cleaned by `recover` if the process dies right then."""
    if not os.access(d, os.W_OK | os.X_OK):
        return False
    if probe is None:
        return True
    try:
        os.rmdir(new_dir(d, probe))
    except OSError:
        return False
    return True


def plan(path: Path, overwrite: bool) -> str:
    """How `path` can be written: "rename" (a sibling temporary folder renamed into place) or "inplace" (an
    empty folder whose parent is read-only, or a mount point: files are moved in, the manifest last). Raises before any work
    when it cannot be written at all, or must not be (a non-empty folder without overwrite, a file, the current
    folder or one that contains it)."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is a file; save needs a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    cwd = real(os.getcwd())
    if path.exists() and (cwd == path or path in cwd.parents):
        raise ValueError(f"{path} is the current folder or contains it: saving there would replace it; "
                         "choose a new folder")
    anc = path.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise NotADirectoryError(f"cannot save to {path}: {anc} is not a folder")
    mount = path.is_dir() and os.path.ismount(path)  # cannot be renamed away
    if not mount and writable(anc, f".{path.name}.tmp-" if anc == path.parent else None):
        return "rename"
    if path.is_dir() and not any(path.iterdir()) and writable(path, INPLACE_TMP):
        return "inplace"
    if path.is_dir():
        why = "it is a mount point" if mount else f"its parent folder {path.parent} is not writable"
        raise PermissionError(f"cannot replace {path}: {why}")
    raise PermissionError(f"cannot save to {path}: {anc} is not writable")
