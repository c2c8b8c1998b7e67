"""Files that are either the old version or the whole new one: every file of a run folder
(weights, config, metrics, checkpoints, pictures) is written here, never in place.

A write goes to a uniquely named temporary file in the same folder, is flushed and fsynced, and
then ``os.replace``d over the target (atomic on POSIX); a failed write removes its temporary file
and leaves the previous version untouched.
"""
import io
import json
import os
import tempfile
from pathlib import Path

import torch


TEMP_SUFFIX = ".ppl-lvm-tmp"  # distinctive: a run folder may hold a user's own files
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def temp_files(folder):
    """Temporary files ``atomic_write`` left in ``folder`` (only a killed process leaves them)."""
    return sorted(Path(folder).glob(f".*{TEMP_SUFFIX}"))


class WriteError(OSError):
    """A file could not be written (full disk, no permission, ...); the previous version stays."""


def atomic_write(path, data):
    """Write ``data`` (bytes) to ``path`` atomically. Raises WriteError naming ``path``."""
    path = Path(path)
    handle, tmp = None, None
    try:
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        # mkstemp makes 0600 files: keep the mode the file had, or the one open() would give
        os.fchmod(handle, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK)
        with os.fdopen(handle, "wb") as file:
            handle = None  # the file object owns it now
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)
    except OSError as error:
        kept = "the previous version is kept" if path.exists() else "nothing was written"
        raise WriteError(error.errno, f"could not write {path}: {error.strerror or error}; "
                                      f"{kept}") from error
    finally:
        if handle is not None:
            os.close(handle)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _fsync_folder(folder):
    # the rename itself is only durable once the folder's entry is on disk
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path, text):
    atomic_write(path, text.encode())


def write_json(path, value):
    write_text(path, json.dumps(value, indent=2))


def torch_save(value, path):
    """``torch.save(value, path)``, atomically (serialised in memory first, so a failure while
    pickling leaves no file behind either)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    atomic_write(path, buffer.getvalue())


def save_figure(fig, path, **kwargs):
    """``fig.savefig(path)`` as a PNG, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **kwargs)
    atomic_write(path, buffer.getvalue())
