"""SHA-256 of a file, streamed (a 325 MB backbone is never held in memory to hash it). Its
own module so that torch-free code (the quantizer, the data scanner) can use it cheaply."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike) -> str:
    """Lowercase hex SHA-256 of the file at `path`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
