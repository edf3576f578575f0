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


@pytest.mark.parametrize("data", [b"junk", b"", b"\x80"])
def test_tiny_file(tmp_path, data):
    """A few bytes (an empty or interrupted download) is the same clear error, not a struct.error."""
    path = tmp_path / "tiny.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(path)


def test_plain_pickle_is_named_and_torch_advice_never_relayed(tmp_path):
    import pickle

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0], "obj": Exception("x")}, protocol=4))
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert "plain Python pickle" in msg and "could run code" in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg
    assert "\n" not in msg


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


# -- every released U-ViT size: our state dict is exactly the original layout ----------------------

# nnet kwargs of the published configs (baofff/U-ViT configs/*.py, DPT configs); the original's
# num_classes counts label-embedding rows (-1 = unconditional, 1001 = 1000 classes + null class)
_RELEASED = {
    "cifar10_uvit_small": dict(img_size=32, patch_size=2, embed_dim=512, depth=12, num_classes=-1),
    "celeba64_uvit_small": dict(img_size=64, patch_size=4, embed_dim=512, depth=12, num_classes=-1),
    "imagenet64_uvit_mid": dict(img_size=64, patch_size=4, embed_dim=768, depth=16, num_classes=1000),
    "imagenet64_uvit_large": dict(img_size=64, patch_size=4, embed_dim=1024, depth=20, num_classes=1000),
    "imagenet256_uvit_large": dict(
        img_size=32, patch_size=2, in_chans=4, embed_dim=1024, depth=20, num_classes=1001
    ),
    "imagenet256_uvit_huge": dict(
        img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_classes=1001, conv=False
    ),
    "imagenet512_uvit_large": dict(
        img_size=64, patch_size=4, in_chans=4, embed_dim=1024, depth=20, num_classes=1001
    ),
    "imagenet512_uvit_huge": dict(
        img_size=64, patch_size=4, in_chans=4, embed_dim=1152, depth=28, num_classes=1001, conv=False
    ),
}
# how each is built here: preset + overrides
_OURS = {
    "cifar10_uvit_small": ("uvit-s2", dict(num_classes=0)),
    "celeba64_uvit_small": ("uvit-s2", dict(img_size=64, patch_size=4, num_classes=0)),
    "imagenet64_uvit_mid": ("uvit-m4", dict(null_class=False)),
    "imagenet64_uvit_large": ("uvit-m4", dict(embed_dim=1024, depth=20, num_heads=16, null_class=False)),
    "imagenet256_uvit_large": ("uvit-l2", {}),
    "imagenet256_uvit_huge": ("uvit-h2", {}),
    "imagenet512_uvit_large": ("uvit-l4", {}),
    "imagenet512_uvit_huge": ("uvit-h4", {}),
}


def _original_layout(img_size, patch_size, embed_dim, depth, num_classes, in_chans=3, conv=True):
    """Key -> shape of the original U-ViT state dict, written from the published architecture."""
    d, p, c = embed_dim, patch_size, in_chans
    extras = 2 if num_classes > 0 else 1  # [label token], time token
    out = {
        "pos_embed": (1, extras + (img_size // p) ** 2, d),
        "patch_embed.proj.weight": (d, c, p, p),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
        "decoder_pred.weight": (p * p * c, d),
        "decoder_pred.bias": (p * p * c,),
    }
    if num_classes > 0:
        out["label_emb.weight"] = (num_classes, d)
    if conv:
        out["final_layer.weight"], out["final_layer.bias"] = (c, c, 3, 3), (c,)

    def block(prefix: str, skip: bool) -> None:
        shapes = {
            "norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d),
            "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
            "mlp.fc1.weight": (4 * d, d), "mlp.fc1.bias": (4 * d,), "mlp.fc2.weight": (d, 4 * d),
            "mlp.fc2.bias": (d,),
        }  # fmt: skip
        if skip:
            shapes |= {"skip_linear.weight": (d, 2 * d), "skip_linear.bias": (d,)}
        out.update({f"{prefix}.{k}": v for k, v in shapes.items()})

    for i in range(depth // 2):
        block(f"in_blocks.{i}", False)
        block(f"out_blocks.{i}", True)
    block("mid_block", False)
    return out


@pytest.mark.parametrize("name", list(_RELEASED))
def test_released_sizes_have_the_original_layout(name):
    preset, overrides = _OURS[name]
    with torch.device("meta"):
        net = create_uvit(preset, **overrides)
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert ours == _original_layout(**_RELEASED[name])


def test_training_state_prefers_ema(tmp_path):
    """Our stage-2 model.pt / checkpoint.pt hold raw and EMA weights: the EMA ones are read."""
    raw, ema = _net(0), _net(1)
    path = tmp_path / "model.pt"
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "step": 10}, path)
    dst = _net(2)
    load_uvit_checkpoint(dst, path)
    torch.testing.assert_close(_outputs(dst), _outputs(ema), rtol=0, atol=0)


def _reference_uvit(sd: dict, x, t, y, heads: int, patch: int):
    """The original U-ViT forward, written functionally over an original-format state dict."""
    import math

    import torch.nn.functional as F

    d = sd["pos_embed"].shape[-1]
    lin = lambda h, name: F.linear(h, sd[f"{name}.weight"], sd.get(f"{name}.bias"))  # noqa: E731
    ln = lambda h, name: F.layer_norm(h, (d,), sd[f"{name}.weight"], sd[f"{name}.bias"])  # noqa: E731

    def block(h, name, skip=None):
        if skip is not None:
            h = lin(torch.cat([h, skip], -1), f"{name}.skip_linear")
        b, n, _ = h.shape
        qkv = lin(ln(h, f"{name}.norm1"), f"{name}.attn.qkv").reshape(b, n, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, N, Dh) each
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1)
        h = h + lin((att @ v).transpose(1, 2).reshape(b, n, d), f"{name}.attn.proj")
        mlp = lin(F.gelu(lin(ln(h, f"{name}.norm2"), f"{name}.mlp.fc1")), f"{name}.mlp.fc2")
        return h + mlp

    c = x.shape[1]
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)  # (B, L, D)
    half = d // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=x.dtype) / half)
    temb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)[:, None]
    h = torch.cat([sd["label_emb.weight"][y][:, None], temb, tokens], 1) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("in_blocks."))
    skips = []
    for i in range(depth):
        h = block(h, f"in_blocks.{i}")
        skips.append(h)
    h = block(h, "mid_block")
    for i in range(depth):
        h = block(h, f"out_blocks.{i}", skips.pop())
    h = lin(ln(h, "norm"), "decoder_pred")[:, 2:]  # (B, L, p*p*C)
    g = math.isqrt(h.shape[1])
    img = h.reshape(-1, g, g, patch, patch, c).permute(0, 5, 1, 3, 2, 4).reshape(-1, c, g * patch, g * patch)
    if "final_layer.weight" in sd:
        img = F.conv2d(img, sd["final_layer.weight"], sd["final_layer.bias"], padding=1)
    return img


@pytest.mark.parametrize("conv", [True, False])
def test_loaded_checkpoint_matches_reference_forward(tmp_path, conv):
    """An original-format nnet_ema.pth (random weights) through our loader and UViT computes the
    same eps as the reference U-ViT maths on the raw state dict."""
    torch.manual_seed(0)
    src = create_uvit("uvit-tiny8", depth=4, conv=conv)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in src.state_dict().items()}  # non-trivial norms
    path = tmp_path / "nnet_ema.pth"
    torch.save(state, path)
    net = create_uvit("uvit-tiny8", depth=4, conv=conv).eval()
    load_uvit_checkpoint(net, path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([1.0, 250.5, 999.0])
    y = torch.tensor([0, 7, 10])  # 10 = the null class
    with torch.no_grad():
        got = net(x, t, y)
    sd64 = {k: v.double() for k, v in state.items()}
    want = _reference_uvit(sd64, x.double(), t.double(), y, heads=4, patch=2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
