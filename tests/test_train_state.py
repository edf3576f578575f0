"""The train state both trainers checkpoint (dpt_engine.train.state)."""

from __future__ import annotations

import pytest
import torch

from dpt_engine.train.checkpoint import CheckpointManager
from dpt_engine.train.state import TRAINER_FILE, TrainState, load_train_state, save_train_state


def _state(seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return TrainState(torch.Generator().manual_seed(seed), model=model, optimizer=opt)


def _train(st: TrainState, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(4, 3, generator=st.gen)
        loss = st.model(x).square().mean() + 1e-3 * torch.randn(())  # uses the global RNG too
        st.optimizer.zero_grad()
        loss.backward()
        st.optimizer.step()
        st.step += 1
        st.history.append({"step": st.step, "loss": float(loss.detach())})


def test_save_and_resume_continue_bit_identically(tmp_path):
    ref = _state(0)
    _train(ref, 6)

    run = _state(0)
    _train(run, 3)
    ckpts = CheckpointManager(tmp_path / "checkpoints", keep=1)
    files_written = []
    save_train_state(
        ckpts,
        run,
        {"trainer": "test"},
        header={"fingerprint": "abc"},
        write_files=lambda d: files_written.append(d),
    )
    assert len(files_written) == 1 and ckpts.latest().name == "step-00000003"
    payload = torch.load(ckpts.latest() / TRAINER_FILE, weights_only=True)
    assert payload["fingerprint"] == "abc" and set(payload) == {
        "fingerprint",
        "step",
        "history",
        "generator",
        "model",
        "optimizer",
    }

    torch.manual_seed(123)  # a fresh process: other weights, other random states
    resumed = _state(7)
    seen = {}
    load_train_state(
        ckpts.latest(),
        resumed,
        require_digests=True,
        check=lambda ck, path: seen.update(fingerprint=ck["fingerprint"], path=path.name),
        read_files=lambda d: seen.update(dir=d.name),
    )
    assert seen == {"fingerprint": "abc", "path": TRAINER_FILE, "dir": "step-00000003"}
    assert resumed.step == 3 and resumed.history == run.history
    _train(resumed, 3)
    assert resumed.history == ref.history
    for a, b in zip(resumed.model.parameters(), ref.model.parameters()):
        assert torch.equal(a, b)


def test_check_refuses_before_anything_is_restored(tmp_path):
    st = _state(0)
    _train(st, 2)
    ckpts = CheckpointManager(tmp_path / "c", keep=1)
    save_train_state(ckpts, st, {}, header={"fingerprint": "abc"})
    other = _state(5)
    before = [p.clone() for p in other.model.parameters()]

    def check(ck, path):
        if ck["fingerprint"] != "xyz":
            raise ValueError(f"{path}: another configuration")

    with pytest.raises(ValueError, match="another configuration"):
        load_train_state(ckpts.latest(), other, require_digests=True, check=check)
    assert other.step == 0 and all(torch.equal(a, b) for a, b in zip(other.model.parameters(), before))


def test_upgrade_maps_an_earlier_layout(tmp_path):
    st = _state(0)
    _train(st, 2)

    class EarlierLayout:  # what an earlier version wrote: the data generator under another name
        step = st.step

        def state_dict(self):
            sd = st.state_dict()
            sd["gen"] = sd.pop("generator")
            return sd

    ckpts = CheckpointManager(tmp_path / "c", keep=1)
    save_train_state(ckpts, EarlierLayout(), {})
    with pytest.raises(KeyError, match="generator"):
        load_train_state(ckpts.latest(), _state(1), require_digests=True)
    fresh = _state(1)
    load_train_state(
        ckpts.latest(), fresh, require_digests=True, upgrade=lambda p: {**p, "generator": p["gen"]}
    )
    assert fresh.step == 2 and torch.equal(fresh.gen.get_state(), st.gen.get_state())


def test_parts_are_attributes_and_reserved_names_are_refused():
    st = _state(0)
    assert isinstance(st.model, torch.nn.Linear) and st.parts["optimizer"] is st.optimizer
    with pytest.raises(AttributeError, match="no attribute or part 'ema'"):
        _ = st.ema
    with pytest.raises(ValueError, match="may not be named"):
        TrainState(torch.Generator(), step=st.model)
