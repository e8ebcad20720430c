"""Write an ONNX file all at once or not at all.

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


def check_writable(path: str | os.PathLike) -> str:
    """The absolute target path, or ValueError saying why it cannot be written (checked before any work)."""
    path = os.path.realpath(os.fspath(path))  # (a link's target is the file written)
    directory = os.path.dirname(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; give a file name such as {os.path.join(path, 'model.onnx')}")
    if os.path.exists(path) and not os.path.isfile(path):
        mode = os.stat(path).st_mode
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise ValueError(f"cannot write {path}: it is {kind}, and the file would replace it; give a file name")
    if not os.path.isdir(directory):
        raise ValueError(f"cannot write {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: directory {directory} is not writable")
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


def serialize(model) -> bytes:
    """The model as one protobuf; a model over protobuf's 2 GB limit cannot be one file."""
    try:
        return model.SerializeToString()
    except ValueError as e:
        raise ValueError(f"the ONNX model is too large for a single file (protobuf limit 2 GB): {e}") from e
