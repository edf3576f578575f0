"""``dpt_engine.utils.pixels`` against the exact formulas it replaced, bit for bit.

The four old functions, copied here verbatim as the reference:

* ``generation.to_uint8`` and ``eval.fid.images_to_uint8`` (the same values: the second only
  detached first) -> ``model_space_to_uint8``;
* ``diffusion.trainer.to_model_space`` -> ``uint8_to_model_space``;
* ``ssl.augment.to_float`` -> ``uint8_to_unit``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from dpt_engine.utils.pixels import model_space_to_uint8, uint8_to_model_space, uint8_to_unit


def _old_generation_to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _old_fid_images_to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def _old_to_model_space(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div_(127.5).sub_(1.0)


def _old_to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def _all_uint8() -> torch.Tensor:
    """Every uint8 value, twice, as (2, 1, 16, 16), plus a transposed (non-contiguous) view."""
    return torch.arange(256, dtype=torch.uint8).repeat(2).reshape(2, 1, 16, 16)


def _model_space_floats() -> torch.Tensor:
    """Random values past both ends, the ends, zeros, infinities and the values whose scaled
    pixel lies half-way between two integers (the rounding ties)."""
    g = torch.Generator().manual_seed(0)
    ties = (torch.arange(255, dtype=torch.float64) + 0.5) / 127.5 - 1.0
    special = torch.tensor([-1.0, 1.0, 0.0, -0.0, float("inf"), float("-inf"), 1.0 + 1e-7, -1.0 - 1e-7])
    rand = torch.rand(4097, generator=g, dtype=torch.float64) * 3.0 - 1.5
    return torch.cat([ties, special.double(), rand]).reshape(
        -1, 1, 4, 1
    )  # (N, 1, 4, 1): 255 + 8 + 4097 values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_model_space_to_uint8_equals_both_old_formulas(dtype: torch.dtype) -> None:
    x = _model_space_floats().to(dtype)
    got = model_space_to_uint8(x)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert torch.equal(got, _old_generation_to_uint8(x))
    assert torch.equal(got, _old_fid_images_to_uint8(x))
    strided = x.transpose(0, 2)  # non-contiguous input
    assert torch.equal(model_space_to_uint8(strided), _old_generation_to_uint8(strided))


def test_model_space_to_uint8_on_a_tensor_that_requires_grad() -> None:
    x = _model_space_floats().float().requires_grad_()
    got = model_space_to_uint8(x)
    assert not got.requires_grad
    assert torch.equal(got, _old_generation_to_uint8(x))


def test_uint8_to_model_space_and_unit_equal_the_old_formulas() -> None:
    u = _all_uint8()
    for new, old in ((uint8_to_model_space, _old_to_model_space), (uint8_to_unit, _old_to_float)):
        for images in (u, u.transpose(2, 3)):
            got = new(images)
            assert got.dtype == torch.float32 and got.shape == images.shape
            assert torch.equal(got, old(images)), new.__name__
    assert uint8_to_unit(u).min() == 0.0 and uint8_to_unit(u).max() == 1.0
    assert uint8_to_model_space(u).min() == -1.0 and uint8_to_model_space(u).max() == 1.0


def test_round_trip_through_model_space_is_exact() -> None:
    u = _all_uint8()
    assert torch.equal(model_space_to_uint8(uint8_to_model_space(u)), u)


def test_float_input_is_not_changed_in_place() -> None:
    """The in-place division works on a copy even when the input is already float32."""
    x = _all_uint8().float()
    before = x.clone()
    assert torch.equal(uint8_to_unit(x), before / 255.0)
    assert torch.equal(uint8_to_model_space(x), before / 127.5 - 1.0)
    assert torch.equal(x, before)


def test_clamps_and_rounds_at_the_ends() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert model_space_to_uint8(x).tolist() == [0, 0, 128, 255, 255]


_OLD_NAMES = {"to_uint8", "images_to_uint8", "to_model_space", "to_float"}


def test_no_other_module_defines_a_pixel_conversion() -> None:
    """The four old copies are gone: no module of the package defines (or re-exports under) an old
    name; callers import ``dpt_engine.utils.pixels``."""
    root = Path(__file__).resolve().parents[1] / "dpt_engine"
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef) and node.name in _OLD_NAMES:
                found.append(f"{path.relative_to(root)}: def {node.name}")
            if isinstance(node, ast.alias) and (node.asname or "") in _OLD_NAMES:
                found.append(f"{path.relative_to(root)}: import ... as {node.asname}")
    assert not found, found
