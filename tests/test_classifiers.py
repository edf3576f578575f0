"""The classifier registry: names, shapes, the forward_features/head contract, errors."""

from __future__ import annotations

import pytest
import torch

from dpt_engine.models.classifiers import create_classifier, list_classifiers


def test_list_classifiers_has_builtins():
    names = list_classifiers()
    assert "cnn-small" in names and "wrn-28-2" in names
    assert names == sorted(names)


@pytest.mark.parametrize("name", ["cnn-small", "wrn-28-2"])
@pytest.mark.parametrize("in_chans,size", [(1, 8), (3, 32), (1, 28)])
def test_builtin_shapes_and_contract(name, in_chans, size):
    torch.manual_seed(0)
    model = create_classifier(name, 7, in_chans, size).eval()
    x = torch.rand(3, in_chans, size, size)
    logits = model(x)
    assert logits.shape == (3, 7)
    feats = model.forward_features(x)
    assert feats.ndim == 2 and feats.shape[0] == 3
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 7
    torch.testing.assert_close(model.head(feats), logits)
    # the input normalisation is a constant, not part of the state dict
    assert not any(k.endswith(("norm.mean", "norm.std")) for k in model.state_dict())


def test_cnn_small_large_images_get_a_strided_stem():
    model = create_classifier("cnn-small", 10, 3, 64).eval()
    assert len(model.stem) == 1
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 10)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="cnn-small"):
        create_classifier("resnet-9000", 10, 3, 32)
    with pytest.raises(ValueError, match="timm"):
        create_classifier("timm:not_a_model_xyz", 10, 3, 32)


def test_timm_cnn_without_img_size():
    model = create_classifier("timm:resnet10t", 10, 1, 16).eval()
    x = torch.rand(2, 1, 16, 16)
    assert model(x).shape == (2, 10)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features)
    torch.testing.assert_close(model.head(feats), model(x))


def test_timm_vit_with_img_size_and_kwargs():
    model = create_classifier("timm:vit_tiny_patch16_224", 10, 1, 16, patch_size=4, depth=2).eval()
    x = torch.rand(2, 1, 16, 16)
    assert model(x).shape == (2, 10)
    assert model.forward_features(x).shape == (2, 192)
    assert model.model.patch_embed.num_patches == 16
