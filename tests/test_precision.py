"""``precision=auto``: bf16 on CUDA, fp32 elsewhere, said once per setting with the reason."""

from __future__ import annotations

import logging

import pytest

from dpt_engine.utils import precision as P


def test_auto_choice_and_one_log_line(caplog, monkeypatch) -> None:
    P._say_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="dpt_engine"):
        assert P.resolve_precision("auto", "cpu", "sample.precision") == "fp32"
        assert P.resolve_precision("auto", "cpu", "sample.precision") == "fp32"
        assert P.resolve_precision("auto", "meta", "x") == "fp32"
        assert P.resolve_precision("bf16", "cpu", "sample.precision") == "bf16"  # explicit: kept, no log
    lines = [r.getMessage() for r in caplog.records if "sample.precision=auto" in r.getMessage()]
    assert len(lines) == 1 and "-> fp32" in lines[0]
    assert ("native bf16: sample.precision=bf16" in lines[0]) == P.cpu_has_native_bf16()
    with pytest.raises(ValueError, match=r"sample\.precision must be"):
        P.resolve_precision("fp16", "cpu", "sample.precision")
