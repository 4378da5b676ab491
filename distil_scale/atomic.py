"""Files and directories that appear whole or not at all.

Everything the package writes for later reading (configs, metrics rewrites, checkpoint markers and data positions,
shards, corpora, tokenizers, exports, reports) is written under a temporary name beside its target and renamed
over it only when complete: rename(2) within one directory is atomic, so a crash leaves the old file or the new
one, never half of one. `sync=True` also flushes the data to the disk before the rename, for what must survive a
machine's crash, not only the process's (checkpoint files).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _temp_name(path: str | Path, suffix: str = "") -> str:
    path = os.fspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def replacing(path: str | Path, *, suffix: str = "", sync: bool = False) -> Iterator[str]:
    """Yields a temporary path beside `path` to write; renamed over `path` when the block ends without error,
    removed when it raises. `suffix` ends the temporary name, for writers that insist on one (np.savez, savefig);
    `sync` fsyncs the file before the rename."""
    tmp = _temp_name(path, suffix)
    try:
        yield tmp
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_text(path: str | Path, text: str, *, sync: bool = False) -> None:
    with replacing(path, sync=sync) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def save_figure(fig, path: str | Path, *, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG at `path`, whole or not at all."""
    with replacing(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi)


@contextlib.contextmanager
def replacing_dir(path: str | Path) -> Iterator[Path]:
    """Yields a temporary directory beside `path` to fill; it replaces `path` when the block ends without error
    and is removed when it raises.

    rename(2) cannot replace a non-empty directory, so an existing `path` is moved aside first and removed after:
    a crash in between leaves no directory at `path` (the old one beside it), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(_temp_name(path))
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = Path(_temp_name(path, ".old"))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
