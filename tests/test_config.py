"""Config validation: presets, YAML files, key=value overrides and their error messages."""

from __future__ import annotations

import pytest
import yaml

from dpt_engine.config.base import ConfigError, apply_overrides, from_dict, parse_override, to_dict
from dpt_engine.config.presets import list_presets, resolve_config
from dpt_engine.config.schema import ClassifierConfig, DataConfig, PipelineConfig


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_resolves(name):
    cfg = resolve_config(name)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.preset == name
    # the resolved config round-trips through YAML unchanged
    again = from_dict(PipelineConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


def test_overrides_are_typed():
    cfg = resolve_config("digits", overrides=["stage1.steps=10", "stage1.lr=1e-3", "data.labels_per_class=2"])
    assert cfg.stage1.steps == 10
    assert cfg.stage1.lr == pytest.approx(1e-3)
    assert isinstance(cfg.stage1.lr, float)
    assert cfg.data.labels_per_class == 2


def test_int_widens_to_float():
    assert resolve_config(overrides=["stage1.lr=1"]).stage1.lr == 1.0


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'stage1.stepz'.*Did you mean 'steps'"):
        resolve_config(overrides=["stage1.stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'stag1'"):
        resolve_config(overrides=["stag1.steps=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"stage1\.steps: expected int, got str 'many'"):
        resolve_config(overrides=["stage1.steps=many"])
    with pytest.raises(ConfigError, match=r"stage1\.hflip: expected bool"):
        resolve_config(overrides=["stage1.hflip=3"])
    with pytest.raises(ConfigError, match=r"data\.name: expected one of"):
        resolve_config(overrides=["data.name=svhn"])


def test_yaml_file_unknown_key(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("stage1:\n  learner: fixmatch\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'stage1.bogus'"):
        resolve_config(config_file=str(f))


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("preset: digits\nstage1:\n  learner: fixmatch\n  steps: 77\n")
    cfg = resolve_config(config_file=str(f), overrides=["stage1.steps=88"])
    assert cfg.stage1.learner == "fixmatch"
    assert cfg.stage1.steps == 88


def test_missing_or_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(config_file=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve_config(config_file=str(bad))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        resolve_config("nope")


def test_value_checks():
    with pytest.raises(ConfigError, match="exactly one of"):
        from_dict(DataConfig, {"labels_per_class": 2, "label_fraction": 0.1})
    with pytest.raises(ConfigError, match="labels_per_class must be >= 1"):
        from_dict(DataConfig, {"labels_per_class": 0})
    with pytest.raises(ConfigError, match="ema_decay"):
        from_dict(ClassifierConfig, {"ema_decay": 1.5})


def test_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("stage1.steps")
    assert parse_override("data.root=/tmp/x") == ("data.root", "/tmp/x")
    assert parse_override("data.subset_file=null") == ("data.subset_file", None)
    d = apply_overrides({}, ["a.b=1"])
    assert d == {"a": {"b": 1}}


def test_null_clears_optional():
    cfg = resolve_config(overrides=["data.labels_per_class=null", "data.label_fraction=0.1"])
    assert cfg.data.labels_per_class is None
    assert cfg.data.label_fraction == pytest.approx(0.1)


def test_literal_words_that_yaml_reads_as_bool():
    assert resolve_config(overrides=["stage2.label_source=true"]).stage2.label_source == "true"
    with pytest.raises(ConfigError, match=r"stage2\.label_source"):
        resolve_config(overrides=["stage2.label_source=false"])


def test_renamed_key_stage2_backend_still_loads(caplog) -> None:
    """``stage2.backend`` (the distributed strategy's old name) is read as ``stage2.strategy``:
    from a saved config and as an override; an override of the new name wins over an old-named key
    from a file; both names in one section is refused with the fix."""
    import logging

    from dpt_engine.config.base import ConfigError, apply_overrides, from_dict
    from dpt_engine.config.schema import DiffusionConfig, PipelineConfig

    with caplog.at_level(logging.INFO, logger="dpt_engine"):
        assert from_dict(DiffusionConfig, {"backend": "ddp"}).strategy == "ddp"
    data = apply_overrides({}, ["stage2.backend=fsdp2"], PipelineConfig)
    assert data == {"stage2": {"strategy": "fsdp2"}}
    saved = {"stage2": {"backend": "single"}}
    assert apply_overrides(saved, ["stage2.strategy=deepspeed"], PipelineConfig) == {
        "stage2": {"strategy": "deepspeed"}
    }
    with pytest.raises(ConfigError, match=r"keep only 'stage2\.strategy'"):
        from_dict(PipelineConfig, {"stage2": {"backend": "ddp", "strategy": "single"}})
    assert not hasattr(DiffusionConfig(), "backend")
