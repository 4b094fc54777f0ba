"""Service token for the demo server: generated once, git-ignored, mode 0600."""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def ensure_token(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists() or not p.read_text().strip():
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("demo-svc-" + secrets.token_urlsafe(32) + "\n")
    os.chmod(p, 0o600)
    return p
