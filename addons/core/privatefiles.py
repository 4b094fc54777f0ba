"""Files only the gateway's user may read: directories 0700, files 0600, whatever the
umask (os.open with the mode, then fchmod / chmod, so neither a wide nor a narrow umask
changes them). Used for the audit store and for keys in .secrets/. No mitmproxy import."""
from __future__ import annotations

import os
from pathlib import Path


def private_dir(path: str | os.PathLike) -> Path:
    """Create (parents too) with mode 0700; an existing directory of ours that group or
    others can access is narrowed to 0700 (one owned by someone else, e.g. a mounted
    secrets volume, is left alone: `mcp-bastion check` reports it)."""
    p = Path(path)
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = p.stat()
    if st.st_mode & 0o077 and st.st_uid == os.getuid():
        os.chmod(p, 0o700)
    return p


def open_private(path: str | os.PathLike, flags: int) -> int:
    """os.open with mode 0600 and an fchmod."""
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_private(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> bool:
    """Write a 0600 file atomically (temporary file, fsync, then rename). overwrite=False
    never replaces an existing file (hard link): when processes race to create a key, all
    keep the first one. Returns False if the file existed and was kept."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if overwrite:
            os.replace(tmp, p)
            return True
        os.link(tmp, p)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
