"""Which checkpoints are ours: an HMAC over each checkpoint's file digests with a local secret key.

DeepSpeed's ``load_checkpoint`` and DCP's ``.metadata`` unpickle their files, so resuming from a
sharded checkpoint runs whatever its pickles say. The sha256 digests in ``meta.json`` prove the
files were not changed after the save, but anyone can write a directory with matching digests.
The signature closes that: ``meta.json`` carries ``HMAC-SHA256(key, digests)`` made with a secret
that only this account holds, so a run directory crafted elsewhere (or copied from an untrusted
source) is refused for those backends.

The key: ``DPT_CHECKPOINT_KEY`` (any string; set the same value on every node of a multi-node run
whose home directories are not shared), else the file ``DPT_CHECKPOINT_KEY_FILE``, else
``$XDG_CONFIG_HOME/dpt_engine/checkpoint.key`` (``~/.config/...``), 32 random bytes created on first
use with permissions 0600. Only rank 0 signs and checks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any, Optional

__all__ = ["key_location", "sign", "signature_matches"]


def key_location() -> str:
    """Where the key comes from, for messages."""
    if os.environ.get("DPT_CHECKPOINT_KEY"):
        return "the DPT_CHECKPOINT_KEY environment variable"
    return str(_key_file())


def _key_file() -> Path:
    explicit = os.environ.get("DPT_CHECKPOINT_KEY_FILE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "dpt_engine" / "checkpoint.key"


def _key(create: bool) -> Optional[bytes]:
    env = os.environ.get("DPT_CHECKPOINT_KEY")
    if env:
        return env.encode("utf-8")
    path = _key_file()
    try:
        data = path.read_bytes()
        if len(data) >= 16:
            return data
    except OSError:
        pass
    if not create:
        return None
    try:  # created once, atomically, readable by this account only
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # fails if another process created it first: use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return path.read_bytes()
    except OSError:
        return None


def _message(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign(payload: dict[str, Any]) -> Optional[str]:
    """``HMAC-SHA256`` of ``payload`` (JSON) with the local key, hex; None when no key can be made
    (an unwritable home: the checkpoint is then resumable only by the unpickling-free backends)."""
    key = _key(create=True)
    return None if key is None else hmac.new(key, _message(payload), hashlib.sha256).hexdigest()


def signature_matches(payload: dict[str, Any], signature: Any) -> bool:
    key = _key(create=False)
    if key is None or not isinstance(signature, str):
        return False
    expected = hmac.new(key, _message(payload), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)
