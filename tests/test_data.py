"""CIFAR-10 loader and on-device augmentation: both pickle encodings, clear errors, exact
crop/flip."""
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import data
from common.errors import DataError


class Py2StylePickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` opcodes (SHORT_BINSTRING / BINSTRING), as the official
    CIFAR files were written: under ``encoding="latin1"`` they load as str, under "bytes" as
    bytes."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def make_batch(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    y = [int(v) for v in rng.integers(0, 10, size=n)]
    return x, y


def write_batch(path, x, y, layout):
    """Write a batch dict in one of three layouts of the format."""
    if layout == "py2":        # Python-2 pickle: keys and strings are py2 str
        d = {b"batch_label": b"training batch", b"labels": y, b"data": x,
             b"filenames": [b"img_%d.png" % i for i in range(len(y))]}
        with open(path, "wb") as f:
            Py2StylePickler(f, protocol=2).dump(d)
    elif layout == "str-keys":
        with open(path, "wb") as f:
            pickle.dump({"batch_label": "b", "labels": y, "data": x, "filenames": []}, f)
    elif layout == "bytes-keys":
        with open(path, "wb") as f:
            pickle.dump({b"batch_label": b"b", b"labels": y, b"data": x, b"filenames": []}, f)
    else:
        raise ValueError(layout)


def make_tree(root, layout="py2", n=20):
    d = root / data.BATCHES_DIR
    d.mkdir(parents=True)
    arrays = {}
    for i, name in enumerate(data.TRAIN_FILES + (data.TEST_FILE,)):
        x, y = make_batch(n, i)
        write_batch(d / name, x, y, layout)
        arrays[name] = (x, y)
    return d, arrays


@pytest.mark.parametrize("layout", ["py2", "str-keys", "bytes-keys"])
def test_read_batch_all_encodings(tmp_path, layout):
    x, y = make_batch(30, 1)
    path = tmp_path / "batch"
    write_batch(path, x, y, layout)
    if layout == "py2":        # the file really behaves like a Python 2 pickle
        with open(path, "rb") as f:
            assert b"data" in pickle.load(f, encoding="bytes")
        with open(path, "rb") as f:
            assert "data" in pickle.load(f, encoding="latin1")
    images, labels = data.read_batch(path)
    assert images.dtype == np.uint8 and images.shape == (30, 3, 32, 32)
    assert np.array_equal(images.reshape(30, -1), x)
    # R plane first, then G, then B, each 32x32 row-major
    assert images[3, 1, 2, 5] == x[3, 1024 + 2 * 32 + 5]
    assert labels.dtype == np.int64 and labels.tolist() == y


def test_truncated_and_missing_files_fail_clearly(tmp_path):
    x, y = make_batch(30, 2)
    path = tmp_path / "data_batch_1"
    write_batch(path, x, y, "py2")
    raw = path.read_bytes()
    for cut in (len(raw) // 2, 10, 0):
        path.write_bytes(raw[:cut])
        with pytest.raises(DataError, match="truncated or corrupt") as e:
            data.read_batch(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="not found"):
        data.read_batch(tmp_path / "nope")


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil"
    with open(path, "wb") as f:
        pickle.dump({"data": os.getcwd, "labels": []}, f)    # a global outside numpy
    with pytest.raises(DataError, match="corrupt"):
        data.read_batch(path)


def test_bad_content_fails_clearly(tmp_path):
    x, y = make_batch(5, 3)
    path = tmp_path / "b"
    write_batch(path, x[:, :100], y, "str-keys")
    with pytest.raises(DataError, match="3072"):
        data.read_batch(path)
    write_batch(path, x, y[:4], "str-keys")
    with pytest.raises(DataError, match="labels"):
        data.read_batch(path)


def test_an_empty_test_batch_is_refused_before_training(tmp_path):
    """A test batch without images would train a whole epoch, then divide by zero images."""
    d, _ = make_tree(tmp_path)
    x, y = make_batch(0, 9)
    write_batch(d / data.TEST_FILE, x, y, "str-keys")
    with pytest.raises(DataError, match="the test batches hold no images"):
        data.load_cifar10(str(tmp_path), download=False)


@pytest.mark.parametrize("point_at", ["parent", "batches"])
def test_load_from_either_folder_and_env(tmp_path, monkeypatch, point_at):
    d, arrays = make_tree(tmp_path, "py2")
    arg = str(tmp_path if point_at == "parent" else d)
    tx, ty, vx, vy, found = data.load_cifar10(arg, download=False)
    assert found == d
    assert tx.shape == (100, 3, 32, 32) and vx.shape == (20, 3, 32, 32)
    assert np.array_equal(tx[:20].reshape(20, -1), arrays["data_batch_1"][0])
    assert np.array_equal(vy, arrays["test_batch"][1])
    monkeypatch.setenv(data.ENV_VAR, arg)
    assert data.resolve_data_dir(None) == (type(tmp_path)(arg), data.ENV_VAR)
    assert data.load_cifar10(None, download=False)[4] == d
    assert data.resolve_data_dir("/elsewhere")[1] == "--data-dir"


def test_missing_data_offline_message(tmp_path, monkeypatch):
    def offline(root):
        root.mkdir(parents=True, exist_ok=True)
        raise OSError("Name or service not known")
    monkeypatch.setattr(data, "_download", offline)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        data.load_cifar10(str(missing))
    msg = str(e.value)
    assert str(missing) in msg and "--data-dir" in msg and data.ENV_VAR in msg and "\n" not in msg
    assert not missing.exists()          # no empty folder left behind
    make_tree(tmp_path / "partial")
    (tmp_path / "partial" / data.BATCHES_DIR / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        data.load_cifar10(str(tmp_path / "partial"))


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------
def reference_crop_flip(images, codes, pad=4):
    """Per-image reference, straight from the paper: pad with zeros, slice the crop, maybe flip."""
    out = []
    for img, code in zip(images, codes.tolist()):
        dy, dx, flip = code // 18, (code // 2) % 9, code % 2
        crop = F.pad(img, (pad, pad, pad, pad))[:, dy:dy + 32, dx:dx + 32]
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)


def test_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (data.AUG_CODES, 3, 32, 32), dtype=torch.uint8, generator=g)
    codes = torch.arange(data.AUG_CODES)                  # every (dy, dx, flip) once
    out = data.crop_flip(images, codes)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, reference_crop_flip(images, codes))
    # dy = dx = 4 without flip is the identity
    ident = torch.full((4,), 4 * 18 + 4 * 2)
    assert torch.equal(data.crop_flip(images[:4], ident), images[:4])


def test_augmentation_distribution():
    g = torch.Generator().manual_seed(1)
    codes = data.draw_augmentation(200_000, g, torch.device("cpu"))
    counts = torch.bincount(codes, minlength=data.AUG_CODES).float()
    assert counts.numel() == data.AUG_CODES and counts.min() > 0
    expected = 200_000 / data.AUG_CODES
    assert ((counts - expected).abs() / expected).max() < 0.15
    assert abs((codes % 2).float().mean().item() - 0.5) < 0.01


def uniform_images(labels):
    """Each image is a constant: 20 * its label (so labels can be read back from pixels)."""
    return (labels.view(-1, 1, 1, 1) * 20).to(torch.uint8).expand(-1, 3, 32, 32).contiguous()


def small_device_data(n=256):
    y = torch.arange(n) % 10
    x = uniform_images(y)
    return data.DeviceData(x, y, x[:64].clone(), y[:64].clone(), "test")


def test_train_batches_keep_labels_shapes_and_are_seeded():
    d = small_device_data()
    norm = data.Normalizer(torch.device("cpu"))
    raw = data.Normalizer(torch.device("cpu"), mean=(0, 0, 0), std=(1 / 255,) * 3)  # identity

    def epoch(seed, normalizer=raw):
        tb = data.TrainBatches(d, 32, data.make_generator(torch.device("cpu"), seed), normalizer)
        return list(tb)

    batches = epoch(0)
    assert len(batches) == 256 // 32
    seen = []
    for x, y in batches:
        assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (32,)
        # rows/cols 4..27 are never padding: they carry the image's own constant value
        assert torch.equal(x[:, :, 4:28, 4:28],
                           (y * 20).float().view(-1, 1, 1, 1).expand(-1, 3, 24, 24))
        seen.append(y)
    assert sorted(torch.cat(seen).tolist()) == sorted(d.train_y.tolist())   # a permutation
    again = epoch(0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = epoch(1)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(batches, other))
    normed = epoch(0, norm)[0][0]
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(normed, (batches[0][0] / 255 - mean) / std, atol=1e-5)


def test_ddp_shards_make_up_the_single_process_batches():
    d = data.DeviceData(torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8),
                        torch.randint(0, 10, (128,)), torch.zeros(0, 3, 32, 32, dtype=torch.uint8),
                        torch.zeros(0, dtype=torch.long), "test")
    norm = data.Normalizer(torch.device("cpu"))
    cpu = torch.device("cpu")
    single = list(data.TrainBatches(d, 32, data.make_generator(cpu, 5), norm))
    shards = [list(data.TrainBatches(d, 32, data.make_generator(cpu, 5), norm, rank=r,
                                     world_size=2))
              for r in range(2)]
    for s, (a, b) in enumerate(zip(*shards)):
        assert torch.equal(torch.cat([a[0], b[0]]), single[s][0])
        assert torch.equal(torch.cat([a[1], b[1]]), single[s][1])
    with pytest.raises(ValueError, match="divisible"):
        data.TrainBatches(d, 33, data.make_generator(cpu, 5), norm, rank=0, world_size=2)


def test_synthetic_set_is_fixed_and_balanced():
    a, b = data.synthetic_cifar(), data.synthetic_cifar()
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    tx, ty, vx, vy = a
    assert tx.shape == (data.SYNTHETIC_TRAIN, 3, 32, 32)
    assert vx.shape == (data.SYNTHETIC_TEST, 3, 32, 32)
    assert np.ptp(np.bincount(ty)) <= 1


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(data.ENV_VAR), reason=f"{data.ENV_VAR} not set")
def test_real_cifar10():
    tx, ty, vx, vy, _ = data.load_cifar10(None, download=False)
    assert tx.shape == (50_000, 3, 32, 32) and ty.shape == (50_000,)
    assert vx.shape[0] in (1_000, 10_000) and vx.shape[1:] == (3, 32, 32)
    assert np.bincount(ty).tolist() == [5_000] * 10
    for c in range(3):         # exact per-channel moments from the pixel histogram
        hist = np.bincount(tx[:, c].ravel(), minlength=256).astype(np.float64)
        v = np.arange(256) / 255
        mean = (hist * v).sum() / hist.sum()
        std = np.sqrt((hist * (v - mean) ** 2).sum() / hist.sum())
        assert abs(mean - data.CIFAR10_MEAN[c]) < 1e-4 and abs(std - data.CIFAR10_STD[c]) < 1e-4


# ---------------------------------------------------------------------------------------------
# Relative data paths
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A repo root at tmp/repo with a format folder FP32/, and data at tmp/shared/cifar10: the
    layout of the README's ``CIFAR10_DIR=../shared/cifar10``, written from the repo root."""
    repo = tmp_path / "repo"
    (repo / "FP32").mkdir(parents=True)
    monkeypatch.setattr(data, "REPO_ROOT", repo)
    batches, _ = make_tree(tmp_path / "shared" / "cifar10")
    return repo, batches


@pytest.mark.parametrize("via", ["--data-dir", "env"])
def test_relative_path_from_a_format_folder_falls_back_to_the_repo_root(fake_repo, monkeypatch,
                                                                       via):
    repo, batches = fake_repo
    monkeypatch.chdir(repo / "FP32")
    monkeypatch.setattr(data, "_download", lambda root: pytest.fail("tried to download"))
    rel = os.path.join("..", "shared", "cifar10")
    if via == "env":
        monkeypatch.setenv(data.ENV_VAR, rel)
    found = data.load_cifar10(rel if via == "--data-dir" else None)[4]
    assert found == repo / ".." / "shared" / "cifar10" / data.BATCHES_DIR
    assert found.resolve() == batches.resolve()
    assert not (repo / "shared").exists()           # FP32/../shared: no folder made by looking


def test_relative_path_from_the_current_folder_wins(fake_repo, monkeypatch, tmp_path):
    repo, _ = fake_repo
    here, _ = make_tree(repo / "FP32" / "mine")
    monkeypatch.chdir(repo / "FP32")
    assert data.load_cifar10("mine", download=False)[4].resolve() == here.resolve()


def test_missing_relative_path_names_both_places_and_makes_no_folder(fake_repo, monkeypatch):
    repo, _ = fake_repo
    monkeypatch.chdir(repo / "FP32")

    def offline(root):
        root.mkdir(parents=True, exist_ok=True)     # torchvision makes its folder, then fails
        raise OSError("Name or service not known")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(DataError) as e:
        data.load_cifar10(os.path.join("..", "nowhere", "cifar10"))
    msg = str(e.value)
    assert str(repo / "FP32" / ".." / "nowhere" / "cifar10") in msg        # from here
    assert str(repo / ".." / "nowhere" / "cifar10") in msg                 # from the repo root
    assert "relative path" in msg and "\n" not in msg
    assert not (repo / "nowhere").exists() and not (repo.parent / "nowhere").exists()


def test_download_lands_where_the_path_points(tmp_path, monkeypatch):
    def fake_download(root):                       # what torchvision leaves after a download
        make_tree(root)
        (root / "cifar-10-python.tar.gz").write_bytes(b"archive")

    monkeypatch.setattr(data, "_download", fake_download)
    monkeypatch.chdir(tmp_path)
    found = data.load_cifar10("new/cifar")[4]
    assert found == tmp_path / "new" / "cifar" / data.BATCHES_DIR
    assert sorted(p.name for p in (tmp_path / "new" / "cifar").iterdir()) == [data.BATCHES_DIR]


@pytest.mark.parametrize("failure", ["torchvision", "network"])
def test_offline_error_names_the_network_or_torchvision(tmp_path, monkeypatch, failure):
    """A broken torchvision is named as such; a network failure is named as the network."""
    import builtins
    import urllib.error

    if failure == "torchvision":
        real_import = builtins.__import__

        def broken(name, *args, **kw):
            if name.startswith("torchvision"):
                raise RuntimeError("operator torchvision::nms does not exist")
            return real_import(name, *args, **kw)

        monkeypatch.setattr(builtins, "__import__", broken)
    else:
        def offline(root):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

        monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(DataError) as e:
        data.load_cifar10(str(tmp_path / "none"))
    msg = str(e.value)
    assert "\n" not in msg and "network" in msg
    if failure == "torchvision":
        assert "torchvision does not import here (RuntimeError" in msg
    else:
        assert "no network access? (URLError" in msg
