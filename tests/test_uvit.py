"""U-ViT: shapes, conditioning modes, skips, checkpointing, parameter counts, FLOPs, names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpt_engine.models.uvit import (
    UVIT_PRESETS,
    UViTConfig,
    create_uvit,
    flops_per_forward,
    get_uvit_config,
    list_uvits,
    macs_per_forward,
    timestep_embedding,
)


def _inputs(cfg: UViTConfig, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g) if cfg.num_classes else None
    return x, t, y


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry() -> None:
    names = list_uvits()
    assert {
        "uvit-s2",
        "uvit-m4",
        "uvit-l2",
        "uvit-h2",
        "uvit-l4",
        "uvit-h4",
        "uvit-tiny8",
        "uvit-tiny28",
    } <= set(names)
    assert names == sorted(UVIT_PRESETS)
    assert get_uvit_config("uvit-tiny8", depth=2).depth == 2
    with pytest.raises(KeyError, match="uvit-tiny8"):
        create_uvit("uvit-nope")
    with pytest.raises(ValueError):
        UViTConfig(img_size=30, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=4)
    with pytest.raises(ValueError):
        UViTConfig(img_size=32, patch_size=4, in_chans=1, embed_dim=65, depth=2, num_heads=4)


@pytest.mark.parametrize("name", ["uvit-tiny8", "uvit-tiny28"])
@pytest.mark.parametrize("num_classes", [None, 0])
def test_forward_shapes(name: str, num_classes: int | None) -> None:
    overrides = {} if num_classes is None else {"num_classes": num_classes}
    model = create_uvit(name, **overrides).eval()
    cfg = model.cfg
    x, t, y = _inputs(cfg)
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert model.pos_embed.shape == (1, cfg.num_tokens, cfg.embed_dim)
    assert cfg.num_tokens == cfg.num_patches + (2 if cfg.num_classes else 1)
    if cfg.num_classes == 0:
        assert not hasattr(model, "label_emb") and cfg.null_class_id is None
        with pytest.raises(ValueError):
            model(x, t, torch.zeros(3, dtype=torch.long))
    else:
        with pytest.raises(ValueError):
            model(x, t, None)
    # a scalar time broadcasts over the batch
    with torch.no_grad():
        torch.testing.assert_close(model(x, t[0], y), model(x, t[0].expand(3), y))


def test_null_class() -> None:
    model = create_uvit("uvit-tiny8").eval()
    cfg = model.cfg
    assert model.label_emb.num_embeddings == cfg.num_classes + 1 and cfg.null_class_id == cfg.num_classes
    x, t, _ = _inputs(cfg)
    null = torch.full((3,), cfg.null_class_id)
    with torch.no_grad():
        out_null, out_c = model(x, t, null), model(x, t, torch.zeros(3, dtype=torch.long))
    assert not torch.allclose(out_null, out_c)
    assert create_uvit("uvit-tiny8", null_class=False).label_emb.num_embeddings == cfg.num_classes


def test_skip_connections_pair_in_and_out_blocks() -> None:
    model = create_uvit("uvit-tiny8").eval()
    n = model.cfg.depth // 2
    assert len(model.in_blocks) == len(model.out_blocks) == n
    assert all(b.skip_linear is not None for b in model.out_blocks)
    assert all(b.skip_linear is None for b in [*model.in_blocks, model.mid_block])
    in_outs, skip_ins = [], []
    hooks = [b.register_forward_hook(lambda m, i, o: in_outs.append(o)) for b in model.in_blocks]
    hooks += [
        b.skip_linear.register_forward_hook(lambda m, i, o: skip_ins.append(i[0])) for b in model.out_blocks
    ]
    with torch.no_grad():
        model(*_inputs(model.cfg))
    for h in hooks:
        h.remove()
    d = model.cfg.embed_dim
    for j, cat in enumerate(skip_ins):  # out-block j gets in-block n-1-j's output (last in, first out)
        assert torch.equal(cat[..., d:], in_outs[n - 1 - j])
    no_skip = create_uvit("uvit-tiny8", skip=False)
    assert all(b.skip_linear is None for b in no_skip.out_blocks)


def test_grad_checkpointing_same_output_and_grads() -> None:
    torch.manual_seed(0)
    ref = create_uvit("uvit-tiny8").train()
    ckpt = create_uvit("uvit-tiny8", grad_checkpointing=True).train()
    ckpt.load_state_dict(ref.state_dict())
    x, t, y = _inputs(ref.cfg)
    outs = []
    for m in (ref, ckpt):
        out = m(x, t, y)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("name,expected", [("uvit-l2", 286_763_172), ("uvit-h2", 500_832_016)])
def test_param_counts_match_original(name: str, expected: int) -> None:
    with torch.device("meta"):
        model = create_uvit(name)
    assert _n_params(model) == expected
    cfg = model.cfg
    assert model.label_emb.num_embeddings == 1001 and cfg.num_tokens == 258
    assert cfg.conv == (name == "uvit-l2")  # L/2 keeps the final 3x3 conv, H/2 drops it


def test_all_presets_build_on_meta() -> None:
    for name in list_uvits():
        with torch.device("meta"):
            model = create_uvit(name)
        assert _n_params(model) > 0


def test_flops() -> None:
    gmac_l = macs_per_forward(get_uvit_config("uvit-l2")) / 1e9
    gmac_h = macs_per_forward(get_uvit_config("uvit-h2")) / 1e9
    assert 75 < gmac_l < 78 and 131 < gmac_h < 135  # ~77 and ~133 GMAC (REFERENCE.md)
    assert flops_per_forward(get_uvit_config("uvit-h2")) == 2 * macs_per_forward(get_uvit_config("uvit-h2"))


def test_state_dict_names_follow_original() -> None:
    keys = set(create_uvit("uvit-tiny8").state_dict())
    expected = {
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "label_emb.weight",
        "in_blocks.0.norm1.weight",
        "in_blocks.0.attn.qkv.weight",
        "in_blocks.0.attn.proj.weight",
        "in_blocks.0.attn.proj.bias",
        "in_blocks.0.norm2.bias",
        "in_blocks.0.mlp.fc1.weight",
        "in_blocks.0.mlp.fc2.bias",
        "mid_block.attn.qkv.weight",
        "out_blocks.2.skip_linear.weight",
        "out_blocks.2.skip_linear.bias",
        "norm.weight",
        "decoder_pred.weight",
        "decoder_pred.bias",
        "final_layer.weight",
        "final_layer.bias",
    }
    assert expected <= keys
    assert "in_blocks.0.attn.qkv.bias" not in keys  # no qkv bias
    assert not any(k.startswith("final_layer") for k in create_uvit("uvit-tiny8", conv=False).state_dict())


def test_attention_matches_explicit_softmax() -> None:
    model = create_uvit("uvit-tiny8").eval()
    attn = model.in_blocks[0].attn
    x = torch.randn(2, 5, model.cfg.embed_dim)
    h, d = attn.num_heads, model.cfg.embed_dim // attn.num_heads
    q, k, v = attn.qkv(x).reshape(2, 5, 3, h, d).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 5, -1))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def test_timestep_embedding() -> None:
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 6)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(10 * freqs), torch.sin(10 * freqs)]))
    assert timestep_embedding(torch.tensor([3.0]), 7).shape == (1, 7)


def test_low_precision_forward_stays_in_compute_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    model = create_uvit("uvit-tiny8").eval()
    x, t, y = _inputs(model.cfg)
    seen = []
    orig_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append(q.dtype)
        return orig_sdpa(q, k, v, *a, **kw)

    with torch.no_grad():
        ref = model(x, t, y)
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        out = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16 and set(seen) == {torch.bfloat16}  # no fp32 upcast of q/k/v
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
