from __future__ import annotations

import pytest
import torch

from dpt_engine.models.checkpoints import (
    CheckpointError,
    export_uvit_checkpoint,
    load_uvit_checkpoint,
    read_state_dict,
)
from dpt_engine.models.uvit import create_uvit


class _Arbitrary:
    def __init__(self) -> None:
        self.value = 3


def _net(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_uvit("uvit-tiny8", **overrides).eval()


def _outputs(net):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, generator=g)
    t = torch.tensor([10.0, 500.0])
    y = torch.tensor([3, 7])
    with torch.no_grad():
        return net(x, t, y)


@pytest.mark.parametrize("fmt,name", [("pth", "nnet_ema.pth"), ("safetensors", "nnet.safetensors")])
def test_round_trip(tmp_path, fmt, name):
    src = _net(0)
    path = tmp_path / name
    export_uvit_checkpoint(src, path, format=fmt)
    assert not list(tmp_path.glob(".*.tmp"))
    dst = _net(1)
    assert not torch.equal(_outputs(src), _outputs(dst))
    load_uvit_checkpoint(dst, path)
    torch.testing.assert_close(_outputs(dst), _outputs(src), rtol=0, atol=0)
    if fmt == "pth":  # original format: a plain state dict
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert set(raw) == set(src.state_dict())


def test_bad_format(tmp_path):
    with pytest.raises(ValueError):
        export_uvit_checkpoint(_net(), tmp_path / "x.bin", format="npz")


def test_shape_mismatch(tmp_path):
    path = tmp_path / "other.pth"
    export_uvit_checkpoint(_net(0, embed_dim=64), path)
    net = _net(1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_uvit_checkpoint(net, path)
    msg = str(info.value)
    assert "shape differences" in msg
    assert "pos_embed: checkpoint (1, 18, 64) vs model (1, 18, 128)" in msg
    assert "uvit-h2 vs uvit-l2" in msg and "1001" in msg
    # nothing was copied
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_missing_and_unexpected_keys(tmp_path):
    state = _net(0).state_dict()
    state.pop("pos_embed")
    state.pop("label_emb.weight")
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "keys.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_uvit_checkpoint(_net(1), path)
    msg = str(info.value)
    assert "missing keys (2): label_emb.weight, pos_embed" in msg
    assert "unexpected keys (1): extra.weight" in msg


def test_depth_mismatch_lists_counts(tmp_path):
    path = tmp_path / "deep.pth"
    export_uvit_checkpoint(_net(0, depth=12), path)
    with pytest.raises(CheckpointError) as info:
        load_uvit_checkpoint(_net(1), path)
    assert "unexpected keys" in str(info.value) and "more" in str(info.value)


@pytest.mark.parametrize("fmt,name", [("pth", "n.pth"), ("safetensors", "n.safetensors")])
def test_truncated(tmp_path, fmt, name):
    path = tmp_path / name
    export_uvit_checkpoint(_net(), path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")


def test_arbitrary_object_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _net().state_dict(), "obj": _Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="arbitrary Python objects"):
        read_state_dict(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save({"step": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="state dict"):
        read_state_dict(path)


def test_wrapped_and_prefixed(tmp_path):
    src = _net(0)
    wrapped = {
        "model": {f"module.{k}": v for k, v in src.state_dict().items()},
        "step": 1234,
        "optimizer": {"lr": 0.001},
    }
    path = tmp_path / "train_state.pth"
    torch.save(wrapped, path)
    sd = read_state_dict(path)
    assert set(sd) == set(src.state_dict())
    dst = _net(1)
    load_uvit_checkpoint(dst, path)
    torch.testing.assert_close(_outputs(dst), _outputs(src), rtol=0, atol=0)


def test_nnet_wrapped_safetensors_keys(tmp_path):
    src = _net(0)
    path = tmp_path / "nnet.pth"
    torch.save({"nnet": src.state_dict()}, path)
    assert set(read_state_dict(path)) == set(src.state_dict())
