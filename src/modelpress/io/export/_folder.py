"""Export folders are written like `save`: into a temporary sibling folder renamed into place at the end, so a
failed export (an error, a parity check below its threshold) leaves nothing under the final name."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .. import atomic


def check_target(out: Path, overwrite: bool) -> None:
    if atomic.plan(out, overwrite) != "rename":
        raise PermissionError(f"cannot export to {out}: its parent folder {out.parent} is not writable")


@contextmanager
def atomic_folder(out: "str | os.PathLike", overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder to fill; on success it becomes `out` (replacing it only with overwrite=True).
    Same guarantees as `save` (io/atomic.py): leftovers of killed exports are recovered or cleaned, a symlinked
    `out` keeps its link, files follow the umask."""
    out = atomic.real(out)
    atomic.recover(out)
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.new_dir(out.parent, f".{out.name}.tmp-")
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                atomic.usual_mode(f)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        check_target(out, overwrite)  # again: something may have appeared meanwhile
        if out.exists():
            old = atomic.new_dir(out.parent, f".{out.name}.old-")
            os.replace(out, old / "x")
            os.replace(tmp, out)
            atomic.fsync_dir(out.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
            atomic.fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
