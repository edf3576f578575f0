"""Atomic writes: content, permissions, and nothing left behind on failure."""

from __future__ import annotations

import os
import stat

import pytest

from dpt_engine.utils.io import atomic_path, atomic_write_json, read_json


def test_atomic_write_has_plain_file_permissions(tmp_path):
    """Files are readable by others like ones made with open() (mkstemp alone would give 0600)."""
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert read_json(target) == {"x": 1}


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "b.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt"]
