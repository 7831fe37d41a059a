"""The dataset yaml files are checked against their typed schemas (sbn_train.data) when composed."""

from __future__ import annotations

import shutil

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from sbn_train.config import register_configs
from sbn_train.data import DATASET_NAMES, DATASETS, DataError, load_dataset, option_defaults
from sbn_train.paths import config_dir

register_configs()


@pytest.fixture
def hydra_configs(monkeypatch, tmp_path):
    monkeypatch.setenv("SBN_TRAIN_DATA", str(tmp_path / "data"))
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        yield


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_each_dataset_config_composes_typed(hydra_configs, tmp_path, name):
    cfg = compose("config", overrides=[f"dataset={name}"])
    assert OmegaConf.get_type(cfg.dataset) is DATASETS[name].config
    values = OmegaConf.to_container(cfg.dataset, resolve=True)
    assert values == {"name": name, "data_dir": str(tmp_path / "data"), **option_defaults(name)}


@pytest.mark.parametrize("override,key", [
    ("dataset.n_vaild=5", "n_vaild"),          # misspelt key
    ("dataset.n_valid=abc", "n_valid"),        # wrong type
    ("dataset.download_timeout=soon", "download_timeout"),
    ("dataset.data_dir=null", "data_dir"),
])
def test_bad_dataset_overrides_fail_at_compose(hydra_configs, override, key):
    with pytest.raises(ConfigCompositionException, match=key):
        compose("config", overrides=["dataset=mnist", override])


def test_forced_unknown_key_is_rejected_by_the_loader(hydra_configs):
    # `+key=` lifts Hydra's struct check, so the loader's own option check catches it.
    cfg = compose("config", overrides=["dataset=synthetic", "+dataset.n_vaild=5"])
    with pytest.raises(DataError, match="n_vaild"):
        load_dataset(**OmegaConf.to_container(cfg.dataset, resolve=True))


@pytest.mark.parametrize("overrides,key", [
    (["dataset=synthetic", "dataset.latent_sizes=[4,many]"], "latent_sizes"),
    (["dataset=synthetic", "dataset.weight_scale=big"], "weight_scale"),
    (["dataset=omniglot", "dataset.shuffle_seed=1.5"], "shuffle_seed"),
])
def test_wrong_types_of_other_datasets_fail_at_compose(hydra_configs, overrides, key):
    with pytest.raises(ConfigCompositionException, match=key):
        compose("config", overrides=overrides)


def test_valid_overrides_are_converted_to_the_schema_types(hydra_configs):
    cfg = compose("config", overrides=["dataset=omniglot", "dataset.download_timeout=2",
                                       "dataset.shuffle_seed=null", "dataset.data_dir=/somewhere"])
    values = OmegaConf.to_container(cfg.dataset, resolve=True)
    assert values["download_timeout"] == 2.0 and isinstance(values["download_timeout"], float)
    assert values["shuffle_seed"] is None and values["data_dir"] == "/somewhere"


def test_misspelt_key_in_a_dataset_file_fails(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(config_dir(), configs)
    text = (configs / "dataset" / "mnist.yaml").read_text().replace("n_valid:", "n_vaild:")
    (configs / "dataset" / "typo.yaml").write_text(text)
    with initialize_config_dir(version_base="1.3", config_dir=str(configs)):
        with pytest.raises(ConfigCompositionException, match="n_vaild"):
            compose("config", overrides=["dataset=typo"])


def test_schemas_are_not_dataset_choices(hydra_configs):
    loader = GlobalHydra.instance().config_loader()
    assert sorted(loader.get_group_options("dataset")) == sorted(DATASET_NAMES)
    assert sorted(loader.get_group_options("schema/dataset")) == sorted(DATASET_NAMES)


def test_composed_config_loads(hydra_configs):
    cfg = compose("config", overrides=["dataset=synthetic", "dataset.n_train=20", "dataset.n_valid=5",
                                       "dataset.n_test=5", "dataset.latent_sizes=[3]"])
    splits = load_dataset(**OmegaConf.to_container(cfg.dataset, resolve=True))
    assert splits.train.shape == (20, 64) and splits.valid.shape == (5, 64)
