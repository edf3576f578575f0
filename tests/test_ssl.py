"""Semi-supervised learners: thresholds against hand-computed values, augmentation, training, resume."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpt_engine.config.schema import ClassifierConfig
from dpt_engine.data.base import ArrayImageDataset, DataError
from dpt_engine.ssl import (
    ClassifierData,
    FreeMatchThresholds,
    evaluate_top1,
    fit_classifier,
    fixmatch_loss,
    fixmatch_mask,
    freematch_fairness_loss,
    freematch_loss,
    predict_proba,
    strong,
    weak,
)
from dpt_engine.ssl.augment import STRONG_OPS
from dpt_engine.ssl.trainer import INTERRUPT_ENV
from dpt_engine.utils.pixels import uint8_to_unit


@pytest.fixture(scope="module")
def digits():
    """sklearn digits as uint8 (N, 1, 8, 8): a stratified 1297 / 500 train / test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * 255.0 / 16.0).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    itr, ite = train_test_split(np.arange(len(d.target)), test_size=500, stratify=d.target, random_state=0)
    classes = [str(c) for c in range(10)]

    def make(idx: np.ndarray, name: str) -> ArrayImageDataset:
        return ArrayImageDataset(
            torch.from_numpy(images[idx]), torch.from_numpy(d.target[idx]), classes, name
        )

    return make(itr, "train"), make(ite, "test")


def _labeled_subset(labels: torch.Tensor, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False) for c in range(10)]))


# ------------------------------------------------------------------------------------------------
# thresholds and losses
# ------------------------------------------------------------------------------------------------


def test_freematch_thresholds_against_hand_computed_values():
    th = FreeMatchThresholds(num_classes=3, momentum=0.9)
    torch.testing.assert_close(th.tau, torch.tensor(1 / 3))
    torch.testing.assert_close(th.p_model, torch.full((3,), 1 / 3))
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    th.update(probs)
    # tau = 0.9/3 + 0.1 * mean(0.7, 0.6, 0.6, 0.5) = 0.36
    torch.testing.assert_close(th.tau, torch.tensor(0.36))
    # p~ = 0.9/3 + 0.1 * column means (0.375, 0.35, 0.275)
    torch.testing.assert_close(th.p_model, torch.tensor([0.3375, 0.335, 0.3275]))
    # pseudo-label histogram (2, 1, 1) / 4
    torch.testing.assert_close(th.label_hist, torch.tensor([0.35, 0.325, 0.325]))
    # tau(c) = p~(c) / max p~ * tau
    torch.testing.assert_close(
        th.class_thresholds(), torch.tensor([0.36, 0.335 / 0.3375 * 0.36, 0.3275 / 0.3375 * 0.36])
    )
    q = torch.tensor([[0.37, 0.33, 0.30], [0.30, 0.355, 0.345], [0.30, 0.30, 0.40], [0.34, 0.33, 0.33]])
    # class 0 needs 0.36, class 1 0.3573, class 2 0.3493
    assert th.mask(q).tolist() == [1.0, 0.0, 1.0, 0.0]
    # a second update keeps compounding the EMA
    th.update(torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(th.tau, torch.tensor(0.9 * 0.36 + 0.1))
    torch.testing.assert_close(th.label_hist, torch.tensor([0.9 * 0.35, 0.9 * 0.325, 0.9 * 0.325 + 0.1]))


def test_freematch_state_round_trip():
    a = FreeMatchThresholds(4, 0.99)
    a.update(torch.softmax(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), 1))
    b = FreeMatchThresholds(4, 0.99)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_fixmatch_mask():
    probs = torch.tensor([[0.96, 0.02, 0.02], [0.94, 0.03, 0.03], [0.0, 0.0, 1.0]])
    assert fixmatch_mask(probs, 0.95).tolist() == [1.0, 0.0, 1.0]


def test_freematch_fairness_loss_matches_formula():
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    p_model = torch.tensor([0.5, 0.3, 0.2])
    hist = torch.tensor([0.6, 0.4, 0.0])  # a zero bin: 1/0 is taken as 0
    got = freematch_fairness_loss(logits, mask, p_model, hist)
    p = logits[mask.bool()].softmax(1).double()
    h_s = np.bincount(p.argmax(1).numpy(), minlength=3) / len(p)
    inv = lambda v: np.where(v > 0, 1.0 / np.maximum(v, 1e-12), 0.0)  # noqa: E731
    t = p_model.double().numpy() * inv(hist.double().numpy())
    t /= t.sum()
    m = p.mean(0).numpy() * inv(h_s)
    m /= m.sum()
    assert got.item() == pytest.approx(float((t * np.log(m + 1e-12)).sum()), rel=1e-5)
    assert freematch_fairness_loss(logits, torch.zeros(6), p_model, hist).item() == 0.0


def test_fixmatch_loss_by_hand():
    """CE of the strong view against the weak view's argmax, where its confidence passes, averaged
    over all unlabeled images (masked ones count as 0)."""
    weak_logits = torch.tensor([[5.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 0.0, 6.0]])
    strong_logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 1.5]])
    c = fixmatch_loss(weak_logits, strong_logits, 0.95)
    assert c.mask.tolist() == [1.0, 0.0, 1.0] and c.pseudo.tolist() == [0, 0, 2]
    ls = strong_logits.log_softmax(1)
    assert c.loss_u.item() == pytest.approx(float(-(ls[0, 0] + ls[2, 2]) / 3))
    assert c.loss_f.item() == 0.0


def test_freematch_loss_updates_thresholds_then_masks():
    torch.manual_seed(1)
    weak_logits, strong_logits = torch.randn(8, 4) * 3, torch.randn(8, 4)
    th = FreeMatchThresholds(4, momentum=0.9)
    ref = FreeMatchThresholds(4, momentum=0.9)
    c = freematch_loss(weak_logits, strong_logits, th)
    probs = weak_logits.softmax(1)
    ref.update(probs)  # the same update by hand, then the same mask and fairness term
    mask = ref.mask(probs)
    assert torch.equal(th.p_model, ref.p_model) and torch.equal(c.mask, mask)
    ce = F.cross_entropy(strong_logits, probs.argmax(1), reduction="none")
    assert c.loss_u.item() == pytest.approx(float((ce * mask).mean()))
    assert c.loss_f.item() == pytest.approx(
        freematch_fairness_loss(strong_logits, mask, ref.p_model, ref.label_hist).item()
    )


# ------------------------------------------------------------------------------------------------
# augmentation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [weak, strong])
@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (4, 3, 32, 32), (3, 3, 7, 9)])
def test_augment_shape_range_determinism(fn, shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    a = fn(x, torch.Generator().manual_seed(0), hflip=True)
    b = fn(x, torch.Generator().manual_seed(0), hflip=True)
    c = fn(x, torch.Generator().manual_seed(1), hflip=True)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_weak_is_a_reflect_padded_crop():
    x = torch.rand(6, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    y = weak(x, torch.Generator().manual_seed(3), hflip=False)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")  # 12.5 % of 8 = 1 pixel
    for i in range(len(x)):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(y[i], c) for c in crops)


def test_each_strong_op_runs_and_keeps_range():
    x = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    for op in STRONG_OPS:
        y = strong(x, torch.Generator().manual_seed(0), ops=(op,), cutout=False)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1, op
    with pytest.raises(ValueError, match="unknown augmentation"):
        strong(x, torch.Generator(), ops=("warp_drive",))


def test_to_float_range():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8)
    torch.testing.assert_close(uint8_to_unit(x), torch.tensor([0.0, 128 / 255, 1.0]))


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


def _cfg(**kw) -> ClassifierConfig:
    base = dict(
        batch_size=16, uratio=3, lr=0.03, ema_decay=0.99, tau_ema=0.99, eval_every=50, checkpoint_every=50
    )
    base.update(kw)
    return ClassifierConfig(**base)


def test_freematch_learns_digits(digits, tmp_path):
    train, test = digits
    lab = _labeled_subset(train.labels, 4)
    data = ClassifierData(train, lab, train, np.arange(len(train)), test, 10)
    res = fit_classifier(
        _cfg(learner="freematch", steps=100, uratio=2),
        data,
        tmp_path,
        torch.device("cpu"),
        seed=0,
        progress=False,
    )
    assert res.resumed_from == 0
    assert res.test_top1 is not None and res.test_top1 > 80.0, res.test_top1  # chance 10 %, typical 91-93
    assert res.history[-1]["step"] == 100 and "test_top1" in res.history[-1]
    assert {"loss", "loss_x", "loss_u", "mask_rate", "lr", "time", "loss_f"} <= set(res.history[-1])
    assert not res.model.training
    assert (tmp_path / "model.pt").exists() and (
        tmp_path / "checkpoints" / "step-00000100" / "trainer.pt"
    ).exists()
    sd = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(sd[k], v) for k, v in res.model.state_dict().items())
    probs = predict_proba(res.model, test, np.arange(20))
    assert probs.shape == (20, 10) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(20))
    assert evaluate_top1(res.model, test) == pytest.approx(res.test_top1)


@pytest.mark.parametrize("pseudo_share", [None, 0.5], ids=["one-draw", "real-and-pseudo-shares"])
def test_resume_is_bit_identical(digits, tmp_path, monkeypatch, pseudo_share):
    """Also with stage 3's fixed real / pseudo shares of each labeled batch (two samplers)."""
    train, _ = digits
    small = train.subset(np.arange(200))
    lab = _labeled_subset(small.labels, 2)
    split = {} if pseudo_share is None else {"pseudo_share": pseudo_share, "num_real_labeled": 5}
    data = ClassifierData(small, lab, small, np.arange(len(small)), None, 10, **split)
    cfg = _cfg(learner="freematch", steps=12, batch_size=8, uratio=2, eval_every=5, checkpoint_every=4)
    device = torch.device("cpu")

    ref = fit_classifier(cfg, data, tmp_path / "ref", device, seed=3, progress=False)

    monkeypatch.setenv(INTERRUPT_ENV, "8")
    with pytest.raises(KeyboardInterrupt):
        fit_classifier(cfg, data, tmp_path / "run", device, seed=3, progress=False)
    assert not (tmp_path / "run" / "model.pt").exists()
    monkeypatch.delenv(INTERRUPT_ENV)
    res = fit_classifier(cfg, data, tmp_path / "run", device, seed=3, progress=False)

    assert res.resumed_from == 8
    ref_sd, res_sd = ref.model.state_dict(), res.model.state_dict()
    assert ref_sd.keys() == res_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], res_sd[k]), k

    def strip(h):
        return [{k: v for k, v in row.items() if k != "time"} for row in h]

    assert strip(res.history) == strip(ref.history)

    # a finished run re-run with the same arguments just loads it
    again = fit_classifier(cfg, data, tmp_path / "run", device, seed=3, progress=False)
    assert again.resumed_from == 12
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in ref_sd.items())

    # a different configuration refuses the checkpoint
    with pytest.raises(ValueError, match="different configuration"):
        fit_classifier(
            dataclasses.replace(cfg, lr=0.1), data, tmp_path / "run", device, seed=3, progress=False
        )


def test_checkpoints_go_through_the_shared_manager_and_the_old_format_resumes(digits, tmp_path, monkeypatch):
    """Classifier checkpoints are the step directories stage 2 writes (files listed with their
    sha256 in meta.json, the newest kept); a changed file is refused before anything is loaded;
    a ``checkpoint.pt`` of the earlier single-file format is resumed and replaced."""
    from dpt_engine.train.checkpoint import CheckpointIntegrityError

    train, _ = digits
    small = train.subset(np.arange(120))
    data = ClassifierData(small, _labeled_subset(small.labels, 2), small, np.arange(len(small)), None, 10)
    cfg = _cfg(learner="freematch", steps=8, batch_size=8, uratio=2, eval_every=8, checkpoint_every=4)
    cpu = torch.device("cpu")
    ref = fit_classifier(cfg, data, tmp_path / "ref", cpu, seed=1, progress=False)

    run = tmp_path / "run"
    monkeypatch.setenv(INTERRUPT_ENV, "4")
    with pytest.raises(KeyboardInterrupt):
        fit_classifier(cfg, data, run, cpu, seed=1, progress=False)
    monkeypatch.delenv(INTERRUPT_ENV)
    step4 = run / "checkpoints" / "step-00000004"
    meta = json.loads((step4 / "meta.json").read_text())
    assert set(meta["sha256"]) == {"trainer.pt", "rng-rank0.pt"} and meta["step"] == 4

    # the earlier format: one file next to the model, no step directories, the version-1 layout
    # (samplers at the top level, "gen", the logged sums, torch's RNG inside)
    now = torch.load(step4 / "trainer.pt", weights_only=True)
    assert now["version"] == 2 and set(now["batches"]) == {"sampler_l", "sampler_u"}
    v1 = {k: now[k] for k in ("fingerprint", "step", "history", "model", "ema", "optimizer", "thresholds")}
    v1.update(now["batches"], version=1, gen=now["generator"], cuda_rng=None, **now["sums"])
    v1["torch_rng"] = torch.load(step4 / "rng-rank0.pt", weights_only=True)["torch"]
    torch.save(v1, run / "checkpoint.pt")
    shutil.rmtree(run / "checkpoints")
    res = fit_classifier(cfg, data, run, cpu, seed=1, progress=False)
    assert res.resumed_from == 4 and not (run / "checkpoint.pt").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000008"]  # the newest kept
    assert all(torch.equal(res.model.state_dict()[k], v) for k, v in ref.model.state_dict().items())

    # a file changed after it was written is refused before it is unpickled
    trainer_pt = run / "checkpoints" / "step-00000008" / "trainer.pt"
    trainer_pt.write_bytes(trainer_pt.read_bytes() + b"x")
    with pytest.raises(CheckpointIntegrityError, match="changed since it was written"):
        fit_classifier(cfg, data, run, cpu, seed=1, progress=False)


def test_fixmatch_and_supervised_with_labeled_weight(digits, tmp_path):
    train, test = digits
    lab = _labeled_subset(train.labels, 4)
    # poison: the same images again with wrong labels, but weight 0 -> no effect on the loss
    poison_images = train.images[lab]
    poison_labels = (train.labels[lab] + 1 + torch.arange(len(lab)) % 9) % 10
    both = ArrayImageDataset(
        torch.cat([train.images[lab], poison_images]),
        torch.cat([train.labels[lab], poison_labels]),
        train.classes,
    )
    idx = np.arange(2 * len(lab))
    weight = np.concatenate([np.ones(len(lab)), np.zeros(len(lab))])
    cfg = _cfg(learner="supervised", steps=80, eval_every=80)
    clean = fit_classifier(
        cfg,
        ClassifierData(both, idx, None, None, test, 10, weight),
        tmp_path / "w0",
        torch.device("cpu"),
        0,
        False,
    )
    noisy = fit_classifier(
        cfg, ClassifierData(both, idx, None, None, test, 10), tmp_path / "w1", torch.device("cpu"), 0, False
    )
    assert clean.test_top1 > 70.0  # typical 85-87 (noisy: ~60)
    assert clean.test_top1 > noisy.test_top1 + 10.0, (clean.test_top1, noisy.test_top1)
    assert all(row["loss_u"] == 0.0 and row["mask_rate"] == 0.0 for row in clean.history)

    fm = fit_classifier(
        _cfg(learner="fixmatch", steps=20, uratio=2, threshold=0.7, eval_every=20),
        ClassifierData(train, lab, train, np.arange(len(train)), test, 10),
        tmp_path / "fm",
        torch.device("cpu"),
        0,
        False,
    )
    assert fm.test_top1 is not None and 0.0 <= fm.history[-1]["mask_rate"] <= 1.0


def test_bad_inputs_raise(digits, tmp_path):
    train, _ = digits
    unlabeled = ArrayImageDataset(train.images[:50], torch.full((50,), -1), train.classes)
    with pytest.raises(Exception, match="labels in"):
        fit_classifier(
            _cfg(learner="supervised", steps=1),
            ClassifierData(unlabeled, np.arange(5), None, None, None, 10),
            tmp_path,
            torch.device("cpu"),
            0,
            False,
        )
    with pytest.raises(Exception, match="unlabeled data"):
        fit_classifier(
            _cfg(learner="freematch", steps=1),
            ClassifierData(train, np.arange(5), None, None, None, 10),
            tmp_path,
            torch.device("cpu"),
            0,
            False,
        )
    with pytest.raises(ValueError, match="unknown learner"):
        fit_classifier(
            _cfg(learner="meanteacher", steps=1),
            ClassifierData(train, np.arange(5), None, None, None, 10),
            tmp_path,
            torch.device("cpu"),
            0,
            False,
        )


def test_bf16_classifier_training_learns_and_differs_from_fp32(digits, tmp_path):
    """``precision=bf16`` really autocasts on the CPU (the weights differ from fp32 training), the
    model still learns, and the EMA / saved weights stay fp32."""
    train, test = digits
    lab = _labeled_subset(train.labels, 4)
    data = ClassifierData(train, lab, train, np.arange(len(train)), test, 10)
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = fit_classifier(
            _cfg(learner="freematch", steps=100, uratio=2, precision=precision),
            data,
            tmp_path / precision,
            torch.device("cpu"),
            seed=0,
            progress=False,
        )
    a, b = (runs[p].model.state_dict() for p in ("fp32", "bf16"))
    assert all(v.dtype == torch.float32 for v in b.values() if v.is_floating_point())
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    assert runs["bf16"].test_top1 > 80.0 and abs(runs["bf16"].test_top1 - runs["fp32"].test_top1) < 8.0


def test_classifier_precision_auto_keeps_old_fingerprints():
    from dpt_engine.stages.classifier_stage import classifier_fingerprint

    assert "precision" not in classifier_fingerprint(ClassifierConfig())
    assert classifier_fingerprint(ClassifierConfig(precision="bf16"))["precision"] == "bf16"


def test_predict_proba_fast_layout_matches_the_plain_forward():
    """Large CPU calls run a channels_last copy of a conv model: same probabilities to fp32
    rounding, and the caller's model keeps its (contiguous) layout for training."""
    from dpt_engine.data.base import ArrayImageDataset
    from dpt_engine.models.classifiers import create_classifier
    from dpt_engine.ssl.trainer import _CHANNELS_LAST_MIN, predict_proba

    torch.manual_seed(0)
    n = _CHANNELS_LAST_MIN + 100
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
    ds = ArrayImageDataset(images, torch.zeros(n, dtype=torch.long), [str(c) for c in range(10)])
    model = create_classifier("cnn-small", 10, 1, 28).eval()
    fast = predict_proba(model, ds)
    with torch.no_grad():
        ref = torch.cat([model(images[i : i + 512].float() / 255).softmax(1) for i in range(0, n, 512)])
    assert torch.allclose(fast, ref, atol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())


def test_pseudo_share_fixes_each_labeled_batch(digits, tmp_path, monkeypatch):
    """``pseudo_share``: every labeled batch holds round(B * share) images from the pseudo part of
    ``labeled_idx`` and the rest from the real part; share 0 never draws a pseudo image."""
    import dpt_engine.ssl.trainer as trainer_mod

    train, _ = digits
    small = train.subset(np.arange(200))
    lab = _labeled_subset(small.labels, 2)  # 20 positions: the first 5 play the real images
    drawn: list[torch.Tensor] = []
    real_next = trainer_mod._EpochSampler.next

    def spy(self, k, gen):
        out = real_next(self, k, gen)
        drawn.append((self.n, out.clone()))
        return out

    monkeypatch.setattr(trainer_mod._EpochSampler, "next", spy)
    cfg = _cfg(learner="supervised", steps=3, batch_size=8, eval_every=3, checkpoint_every=3)
    for share, want in ((0.25, (6, 2)), (0.0, (8, 0))):
        drawn.clear()
        data = ClassifierData(small, lab, None, None, None, 10, pseudo_share=share, num_real_labeled=5)
        fit_classifier(cfg, data, tmp_path / f"s{share}", torch.device("cpu"), seed=0, progress=False)
        real = [len(p) for n, p in drawn if n == 5]
        pseudo = [len(p) for n, p in drawn if n == 15]
        assert real == [want[0]] * 3 and pseudo == ([want[1]] * 3 if want[1] else [])
    with pytest.raises(DataError, match="pseudo_share"):
        ClassifierData(small, lab, None, None, None, 10, pseudo_share=1.5, num_real_labeled=5).validate(False)


def test_thresholds_carry_from_one_run_into_the_next(digits, tmp_path):
    """A FreeMatch run leaves its final thresholds in ``thresholds.pt`` (and its last checkpoint);
    ``init_thresholds`` starts the next run there instead of at 1/C, and is part of its fingerprint."""
    from dpt_engine.ssl.trainer import THRESHOLDS_FILE, final_thresholds

    train, _ = digits
    lab = _labeled_subset(train.labels, 4)
    data = ClassifierData(train, lab, train, np.arange(len(train)), None, 10)
    cfg = _cfg(learner="freematch", steps=30, uratio=2, tau_ema=0.9)
    fit_classifier(cfg, data, tmp_path / "a", torch.device("cpu"), seed=0, progress=False)
    saved = final_thresholds(tmp_path / "a")
    assert saved is not None and 0.5 < float(saved["tau"]) < 1.0  # risen from 1/C = 0.1
    (tmp_path / "a" / THRESHOLDS_FILE).unlink()  # a run from before the file: its last checkpoint
    from_ckpt = final_thresholds(tmp_path / "a")
    assert from_ckpt is not None and all(torch.equal(saved[k], from_ckpt[k]) for k in saved)
    assert final_thresholds(tmp_path / "nothing") is None

    # one step at momentum 0.9: 90% of the start survives, so the start shows in the end state
    one = _cfg(learner="freematch", steps=1, uratio=2, tau_ema=0.9)
    fit_classifier(one, data, tmp_path / "fresh", torch.device("cpu"), seed=1, progress=False)
    fit_classifier(
        one, data, tmp_path / "carried", torch.device("cpu"), seed=1, progress=False, init_thresholds=saved
    )
    fresh, carried = final_thresholds(tmp_path / "fresh"), final_thresholds(tmp_path / "carried")
    assert float(fresh["tau"]) < 0.2 < 0.9 * float(saved["tau"]) <= float(carried["tau"])
    # resuming the carried run with other starting thresholds is another run
    with pytest.raises(ValueError, match="different configuration"):
        fit_classifier(
            one,
            data,
            tmp_path / "carried",
            torch.device("cpu"),
            seed=1,
            progress=False,
            init_thresholds=fresh,
        )
    with pytest.raises(ValueError, match="init_thresholds"):
        fit_classifier(
            _cfg(learner="fixmatch", steps=1), data, tmp_path / "fm", "cpu", 0, False, init_thresholds=saved
        )
