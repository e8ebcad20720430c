"""Write an output file (an ONNX model, a checkpoint, a report) all at once or not at all.

The bytes go to a hidden temporary file beside the target, created with mode 0666 so the process umask
decides the final permissions (as for any file the user's tools write; `tempfile.mkstemp` would leave
0600), and are renamed over the target only when complete. A failure leaves neither a partial file nor
the temporary one, and an existing file at the target stays as it was. A symbolic link at the target is
followed, as `open` would (the link stays, the file it names is replaced); a target that exists and is not
a regular file (`/dev/null`, a pipe) is refused: a rename would put a file in its place.
"""
from __future__ import annotations

import os
import secrets
import stat

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"),
          (stat.S_ISSOCK, "a socket"))


class OutputPathError(ValueError):
    """An output path that cannot be written; the message says why (checked before any work is done)."""


def check_writable(path: str | os.PathLike) -> str:
    """The absolute target path, or OutputPathError saying why it cannot be written."""
    path = os.path.realpath(os.fspath(path))  # (a link's target is the file written)
    directory = os.path.dirname(path)
    if os.path.isdir(path):
        raise OutputPathError(f"{path} is a directory; give a file name in it")
    if os.path.exists(path) and not os.path.isfile(path):
        mode = os.stat(path).st_mode
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise OutputPathError(f"cannot write {path}: it is {kind}, and the file would replace it; give a file name")
    if not os.path.isdir(directory):
        raise OutputPathError(f"cannot write {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {path}: directory {directory} is not writable")
    return path


def write_atomically(data: bytes, path: str | os.PathLike) -> None:
    path = check_writable(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_folder_writable(path: str | os.PathLike) -> str:
    """The absolute path of an output folder that exists or can be made, or OutputPathError saying why not:
    a file in its place, or no writable folder to make it in (checked before any work)."""
    path = os.path.realpath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f"cannot write into {path}: it is not a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputPathError(f"cannot make the folder {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write into {path}: {existing} is not writable")
    return path
