"""All-or-nothing file writes: a reader of the target directory sees the old files or the new ones, never
a half-written file or a mix of the two.

A file is first written to a temporary file in the target directory (``.<name>.*.graphlora-tmp``,
flushed and fsynced). :func:`commit` then moves every staged file onto its name with ``os.replace`` and
deletes the files that no longer belong, as one step: the files it replaces are hard-linked to backups
first (copied where a link is not possible); if a move fails or the call is interrupted (KeyboardInterrupt
included), the files already replaced are put back and the new ones removed. Temporary files and backups
never outlive the call. Used by ``save_adapter`` and ``save_merged``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _temp_path(directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".graphlora-tmp", dir=directory)
    os.close(fd)
    return Path(tmp)


def _fsync(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    except OSError:  # pragma: no cover - best effort
        pass


def write_text_temp(directory: Path, name: str, text: str) -> Path:
    tmp = _temp_path(directory, name)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_safetensors_temp(directory: Path, name: str, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str]) -> Path:
    import safetensors.torch

    tmp = _temp_path(directory, name)
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        _fsync(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _backup(final: Path, token: str) -> Path:
    backup = final.with_name(f".{final.name}.{token}.graphlora-backup")
    try:
        os.link(final, backup)  # no copy of the data; the old inode survives the replace
    except OSError:
        shutil.copy2(final, backup)
    return backup


def commit(directory: Path, staged: dict[str, Path], remove: Iterable[str] = ()) -> None:
    """Move ``staged`` temporary files onto their names in ``directory`` and delete ``remove``, all or nothing.

    Existing files are hard-linked to backups first; if anything fails (or the call is interrupted by an
    exception such as KeyboardInterrupt), the files already replaced are put back and new ones removed.
    Temporary files never outlive the call.
    """
    token = uuid.uuid4().hex[:8]
    remove = [n for n in remove if n not in staged and (directory / n).exists()]
    backups: dict[str, Path] = {}
    done: list[str] = []  # names already replaced or removed, in order
    try:
        for name in list(staged) + remove:
            if (directory / name).exists():
                backups[name] = _backup(directory / name, token)
        for name, tmp in staged.items():
            os.replace(tmp, directory / name)
            done.append(name)
        for name in remove:
            os.unlink(directory / name)
            done.append(name)
    except BaseException:
        for name in reversed(done):
            final = directory / name
            if name in backups:
                os.replace(backups.pop(name), final)
            elif final.exists():
                final.unlink()
        raise
    finally:
        for tmp in staged.values():
            if tmp.exists():
                tmp.unlink()
        for backup in backups.values():
            if backup.exists():
                backup.unlink()
