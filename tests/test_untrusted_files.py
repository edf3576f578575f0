"""Files a user names are read without running anything from them.

A pickle can run code when it is loaded, and torch-fidelity loads its weights argument with
``weights_only=False``. The FID weights (``sample.fid_weights`` / ``DPT_FID_WEIGHTS``) therefore go
through the project's own readers: TorchScript archives are parsed for their tensors only
(``models/torchscript_tensors.py``), anything else is read with ``weights_only=True``. Each crafted
file below would create a marker file if any of its code ran.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from dpt_engine.models.checkpoints import CheckpointError
from dpt_engine.models.torchscript_tensors import is_torchscript_archive, read_torchscript_state_dict


class _Payload:
    """Unpickling this calls ``Path(marker).touch()``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _crafted_torch_pickle(path: Path, marker: Path) -> Path:
    torch.save({"weight": torch.zeros(2), "evil": _Payload(marker)}, path)
    return path


def _crafted_torchscript_zip(path: Path, marker: Path) -> Path:
    """A zip laid out like a TorchScript archive whose data.pkl calls Path.touch."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/constants.pkl", pickle.dumps(()))
        zf.writestr("m/code/__torch__.py", "")
        zf.writestr("m/data.pkl", pickle.dumps(_Payload(marker)))
    return path


def test_packaged_inception_tensors_equal_torch_jit() -> None:
    """The safe reader returns exactly what torch.jit.load(...).state_dict() does, in the same order."""
    from dpt_engine.eval.fid import InceptionWeightsNotFoundError, find_inception_weights

    try:
        path = find_inception_weights()
    except InceptionWeightsNotFoundError as e:
        pytest.skip(str(e))
    assert is_torchscript_archive(path)
    ours = read_torchscript_state_dict(path)
    with pytest.warns(FutureWarning):
        ref = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert list(ours) == list(ref)
    assert all(torch.equal(ours[k], ref[k]) and ours[k].dtype == ref[k].dtype for k in ref)


@pytest.mark.parametrize("kind", ["torch-pickle", "torchscript-zip"])
def test_crafted_fid_weights_run_no_code(kind: str, tmp_path: Path, monkeypatch) -> None:
    from dpt_engine.eval import fid as F

    marker = tmp_path / "code-ran"
    make = _crafted_torch_pickle if kind == "torch-pickle" else _crafted_torchscript_zip
    crafted = make(tmp_path / "weights.pt", marker)
    images = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="refused"):
        F.load_inception(crafted)
    assert not marker.exists()
    monkeypatch.setenv(F.WEIGHTS_ENV_VAR, str(crafted))  # the same file through DPT_FID_WEIGHTS
    with pytest.raises(CheckpointError, match="refused"):
        F.compute_metrics(images, images)
    assert not marker.exists()


def test_truncated_torchscript_is_a_clear_error(tmp_path: Path) -> None:
    from dpt_engine.eval.fid import InceptionWeightsNotFoundError, find_inception_weights

    try:
        path = find_inception_weights()
    except InceptionWeightsNotFoundError as e:
        pytest.skip(str(e))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: 4 << 20])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_torchscript_state_dict(cut)


def test_state_dict_weights_still_load(tmp_path: Path) -> None:
    """A plain torch-fidelity state dict (not TorchScript) is read with weights_only=True and used."""
    from dpt_engine.eval import fid as F

    try:
        ts = F.find_inception_weights()
    except F.InceptionWeightsNotFoundError as e:
        pytest.skip(str(e))
    ref = F.TFInceptionV3Pool3(F.FEATURE_EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=ts)
    plain = tmp_path / "pt_inception.pth"
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    plain.write_bytes(buf.getvalue())
    other = F.TFInceptionV3Pool3(F.FEATURE_EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=plain)
    x = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(other.eval()(x)[0], ref.eval()(x)[0])
