"""CIFAR-10 held on the training device as uint8, with batched random crop + flip on that device.

Why not ``torchvision.datasets.CIFAR10`` + ``DataLoader``:

* The project's offline copy (``../shared/cifar10``) has the official layout but other md5 sums,
  which torchvision refuses. The pickles are read here directly, so that copy and the official
  files load alike.
* A 32x32 image is tiny: per-sample Python (PIL transforms, worker processes, collation) costs as
  much as a ResNet-20 step. Instead the whole set lives on the device as one uint8 tensor (150 MB
  for the 50,000 training images) and every augmentation is a handful of batched tensor ops
  (pad, one gather for crop and flip together, one multiply-add for normalisation), as fast
  CIFAR trainers do (airbench). No worker processes, nothing per sample in Python.

Augmentation (He et al. 2016, section 4.2): pad 4 pixels of zeros on each side, take a random 32x32
crop, flip horizontally with probability 1/2; then subtract the per-channel mean and divide by the
per-channel standard deviation of the training images. Test images are only normalised.

Randomness: a ``torch.Generator`` on the data's device, seeded from the run's seed, drives the
shuffle and the augmentation draws. Its state is part of the checkpoint, so a resumed run draws
exactly what an uninterrupted one would. Each epoch draws everything at its start (one permutation,
one integer per image coding its crop offsets and flip).

Data directory: ``--data-dir``, else the environment variable ``CIFAR10_DIR``, else ``data/`` in the
repo. It may be the folder holding ``cifar-10-batches-py`` or that folder itself. A relative path
means what it means to every Unix tool, relative to the current folder; when the data is not
there, the same path relative to the repo root is tried too, so the README's
``CIFAR10_DIR=../shared/cifar10`` works from the repo root and from the format folders alike. If
nothing is found, a download with torchvision is tried (into the current-folder reading of the
path); when that fails (offline), a ``DataError`` names every place looked at and how to fix it.
Looking for data never creates a folder: the download goes to a temporary folder first and is
moved into place only once it is complete.
"""
from __future__ import annotations

import os
import pickle
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .config import REPO_ROOT
from .errors import DataError

BATCHES_DIR = "cifar-10-batches-py"                  # folder name inside the official tarball
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
# --val-split holds out the last 5,000 training images (the second half of data_batch_5): model
# choices are made on them, never on the test set.
VAL_IMAGES = 5000
ENV_VAR = "CIFAR10_DIR"
DEFAULT_DATA_DIR = REPO_ROOT / "data"
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)                            # channels R, G, B; each plane 32x32 row-major
PIXELS_PER_IMAGE = 3 * 32 * 32
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and standard deviation of the 50,000 CIFAR-10 training images (pixel/255);
# the shared data folder's README lists the same figures, and tests/test_data.py recomputes them.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
PAD = 4                                              # random-crop padding, He et al. 2016
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 512, 256
SYNTHETIC_SEED = 20160                               # the synthetic set is fixed, whatever --seed
SYNTHETIC_AMPLITUDE, SYNTHETIC_NOISE = 50.0, 40.0         # pixel levels: class signal, noise std


# ----------------------------------------------------------------------------------------------
# Reading the pickles
# ----------------------------------------------------------------------------------------------
class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only admits the globals a CIFAR batch needs (numpy arrays, byte strings).

    A CIFAR batch is a dict of lists, strings and numpy arrays; refusing every other global means a
    tampered file cannot run code on load.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("builtins", "bytearray"), ("__builtin__", "bytearray"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a CIFAR batch")
        if module == "_codecs":
            import codecs
            return codecs.encode
        if module in ("builtins", "__builtin__"):
            return bytearray
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        # numpy 2 moved numpy.core to numpy._core; read either spelling without a warning.
        core = getattr(np, "_core", None) or np.core
        sub = core.multiarray if name == "_reconstruct" else core.numeric
        return getattr(sub, name)


def _key(k) -> str:
    return k.decode("latin1") if isinstance(k, bytes) else k


def read_batch(path: os.PathLike | str) -> Tuple[np.ndarray, np.ndarray]:
    """Read one ``cifar-10-batches-py`` batch file -> (images uint8 (N,3,32,32), labels int64 (N,)).

    Accepts both encodings of the format: the official Python-2 pickles (read here with
    ``encoding="latin1"``, giving str keys) and pickles whose keys are bytes (what the official
    files give under ``encoding="bytes"``, or a Python-3 rewrite with bytes keys). Raises
    ``DataError`` with a one-line message for a missing, truncated or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CIFAR-10 batch file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as e:  # EOFError, UnpicklingError, ValueError from a short numpy buffer, ...
        raise DataError(f"cannot read CIFAR-10 batch {path}: truncated or corrupt file "
                        f"({type(e).__name__}: {e}); "
                        "delete it and download the data again") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch (expected a dict, got {type(raw).__name__})")
    batch = {_key(k): v for k, v in raw.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path}: not a CIFAR-10 batch (keys {sorted(batch)}; "
                        "need 'data' and 'labels')")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS_PER_IMAGE:
        raise DataError(f"{path}: 'data' must be uint8 of shape (N, {PIXELS_PER_IMAGE}), "
                        f"got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.shape[0] if labels.ndim else 0} labels "
                        f"for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels outside 0..{NUM_CLASSES - 1}")
    return data.reshape(-1, *IMAGE_SHAPE), labels


def resolve_data_dir(data_dir: Optional[str] = None) -> Tuple[Path, str]:
    """Which setting names the data: ``--data-dir``, else ``$CIFAR10_DIR``, else ``data/`` in the
    repo. Returns (path as given, where-it-came-from) so error messages can say which setting was
    used; ``candidate_dirs`` turns the path into the folders to look in.
    """
    if data_dir:
        return Path(data_dir).expanduser(), "--data-dir"
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser(), ENV_VAR
    return DEFAULT_DATA_DIR, "default"


def candidate_dirs(path: Path) -> List[Path]:
    """Absolute folders a data path may mean: itself if absolute; a relative path first from the
    current folder (the Unix rule), then from the repo root (the README's paths are written from
    there, and the scripts are also run from the format folders)."""
    path = Path(path)
    if path.is_absolute():
        return [path]
    here, from_root = Path.cwd() / path, REPO_ROOT / path
    return [here] if here.resolve() == from_root.resolve() else [here, from_root]


def find_batches_dir(root: Path) -> Optional[Path]:
    """The ``cifar-10-batches-py`` folder: ``root`` itself or its child of that name, else None.

    A folder that exists but lacks files is returned too, so that the reader names the missing file.
    """
    if root.name == BATCHES_DIR and root.is_dir() or (root / TRAIN_FILES[0]).is_file():
        return root
    if (root / BATCHES_DIR).is_dir():
        return root / BATCHES_DIR
    return None


def _download(root: Path) -> None:
    """Download and unpack the official archive into ``root`` with torchvision (needs internet)."""
    try:
        from torchvision.datasets import CIFAR10
    except Exception as e:      # not installed, or a build that does not match torch's
        raise DataError(f"torchvision does not import here ({type(e).__name__}: {_first_line(e)}); "
                        f"a download needs it and network access") from None
    CIFAR10(root=str(root), train=True, download=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no details"


def _download_reason(e: BaseException) -> str:
    """Why a download failed, in a few words: the network, named, when it is the network."""
    if isinstance(e, DataError):
        return str(e)
    if isinstance(e, OSError):           # URLError, socket.gaierror, timeouts, refused connections
        return f"no network access? ({type(e).__name__}: {_first_line(e)})"
    return f"{type(e).__name__}: {_first_line(e)}"


def _download_into(root: Path) -> None:
    """``_download`` into a temporary folder, then move ``cifar-10-batches-py`` to ``root``
    (creating ``root`` only then): a failed download leaves nothing behind."""
    with tempfile.TemporaryDirectory(prefix="cifar10-download-") as tmp:
        _download(Path(tmp))
        found = find_batches_dir(Path(tmp))
        if found is None:
            raise DataError(f"the downloaded archive holds no {BATCHES_DIR}/")
        root.mkdir(parents=True, exist_ok=True)
        shutil.move(str(found), str(root / BATCHES_DIR))


def _missing_message(path: Path, source: str, reason: str) -> str:
    where = {"--data-dir": f"--data-dir {path}", ENV_VAR: f"${ENV_VAR}={path}",
             "default": f"the default; neither --data-dir nor ${ENV_VAR} was set"}[source]
    looked = " and ".join(str(d) for d in candidate_dirs(path))
    relative = " (a relative path is taken from the current folder, then from the repo root)" \
        if not path.is_absolute() else ""
    return (f"CIFAR-10 not found: looked for {BATCHES_DIR}/ in {looked} ({where}){relative}; "
            f"no download ({reason}). Fix: pass --data-dir DIR or set {ENV_VAR}=DIR, "
            f"DIR being the folder that holds {BATCHES_DIR} (e.g. ../shared/cifar10), "
            f"or run once with internet access to download into {candidate_dirs(path)[0]}")


def load_cifar10(data_dir: Optional[str] = None, download: bool = True
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Path]:
    """Load CIFAR-10 as numpy arrays: (train_x, train_y, test_x, test_y, batches_dir).

    Images are uint8 (N, 3, 32, 32), labels int64. Missing data is downloaded when ``download``
    and online; otherwise ``DataError`` says where it looked and how to fix it.
    """
    path, source = resolve_data_dir(data_dir)
    candidates = candidate_dirs(path)
    batches = next(filter(None, map(find_batches_dir, candidates)), None)
    if batches is None:
        if not download:
            raise DataError(_missing_message(path, source, "download disabled"))
        root = candidates[0]
        print(f"CIFAR-10 not found under {root}: downloading it there with torchvision ...",
              file=sys.stderr, flush=True)
        try:
            _download_into(root)
        except Exception as e:  # URLError when offline, HTTP errors, integrity failures
            raise DataError(_missing_message(path, source, _download_reason(e))) from None
        batches = find_batches_dir(root)
    parts = [read_batch(batches / f) for f in TRAIN_FILES]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = read_batch(batches / TEST_FILE)
    for images, what in ((train_y, "training"), (test_y, "test")):
        if not len(images):             # accuracy over no images is no number
            raise DataError(f"{batches}: the {what} batches hold no images; "
                            "download the data again")
    return train_x, train_y, test_x, test_y, batches


def synthetic_cifar(n_train: int = SYNTHETIC_TRAIN, n_test: int = SYNTHETIC_TEST,
                    seed: int = SYNTHETIC_SEED
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A small generated stand-in for CIFAR-10, for smoke tests only (never for results).

    Each class has a fixed random colour and a fixed random low-frequency pattern (4x4 blocks of
    8x8 pixels per channel); an image is its class's colour and pattern plus per-pixel noise
    (``SYNTHETIC_NOISE``). A working loop learns it in a couple of dozen steps (ResNet-8, batch
    64, 3 epochs of 8 steps: about 76% test accuracy) but not in one step, and a loop whose
    updates do nothing stays at chance (10%): tests/test_train.py checks both. Classes are
    balanced; the set depends on ``seed`` only (not on the run's seed).
    """
    rng = np.random.default_rng(seed)
    colour = rng.uniform(-1, 1, size=(NUM_CLASSES, 3, 1, 1))
    coarse = rng.uniform(-1, 1, size=(NUM_CLASSES, 3, 4, 4))
    pattern = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)       # (10, 3, 32, 32)
    means = 127.5 + SYNTHETIC_AMPLITUDE * (colour + pattern)

    def make(n):
        y = np.arange(n) % NUM_CLASSES
        rng.shuffle(y)
        noise = rng.normal(0, SYNTHETIC_NOISE, size=(n, *IMAGE_SHAPE))
        x = np.clip(means[y] + noise, 0, 255).round().astype(np.uint8)
        return x, y.astype(np.int64)

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return train_x, train_y, test_x, test_y


# ----------------------------------------------------------------------------------------------
# Augmentation and batching on the device
# ----------------------------------------------------------------------------------------------
CROP_CHOICES = 2 * PAD + 1                           # offsets 0..8 in each direction
AUG_CODES = CROP_CHOICES * CROP_CHOICES * 2          # (dy, dx, flip) packed into one integer


def draw_augmentation(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One random int per image coding (dy, dx, flip): uniform crop offset in 0..8 each way,
    flip 1/2."""
    return torch.randint(0, AUG_CODES, (n,), generator=generator, device=device)


def crop_flip(images: torch.Tensor, codes: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Batched random crop (zero padding ``pad``) and horizontal flip, by one gather.

    ``images`` (B, C, H, W) any dtype; ``codes`` (B,) from ``draw_augmentation``: crop offsets
    dy = code // 18, dx = (code // 2) % 9 and flip = code % 2. Output pixel (i, j) of image b is
    padded pixel (dy + i, dx + j), or (dy + i, dx + W-1 - j) when flipped: the crop at (dy, dx),
    mirrored. No per-sample Python: the row/column indices of all images are built at once.
    """
    b, c, h, w = images.shape
    choices = 2 * pad + 1
    dy = codes // (2 * choices)
    dx = (codes // 2) % choices
    flip = (codes % 2).bool()
    padded = F.pad(images, (pad, pad, pad, pad))                       # (B, C, H+2p, W+2p), zeros
    wp = w + 2 * pad
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = dy[:, None] + ar_h                                          # (B, H)
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)   # (B, W)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    out = torch.gather(padded.reshape(b, c, -1), 2, flat)
    return out.view(b, c, h, w)


class Normalizer:
    """uint8 images -> float32 (x/255 - mean) / std as one multiply-add, optionally
    channels-last."""

    def __init__(self, device: torch.device, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                 channels_last: bool = False):
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = mean_t / std_t
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addcmul(-self.shift, x.float(), self.scale)   # x*scale - mean/std
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out


@dataclass
class DeviceData:
    """CIFAR-10 (or the synthetic set) as tensors on one device: uint8 images, int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str                                     # path of the batches, or "synthetic"
    val_x: Optional[torch.Tensor] = None            # held out of training (--val-split)
    val_y: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.train_x.device


def validation_images(n_train: int) -> int:
    """How many training images ``--val-split`` holds out: ``VAL_IMAGES`` (the last 5,000 of
    data_batch_5 on CIFAR-10), or a tenth of a smaller (synthetic) training set."""
    return min(VAL_IMAGES, n_train // 10)


def load_device_data(device: torch.device | str, data_dir: Optional[str] = None,
                     synthetic: bool = False, download: bool = True,
                     val_split: bool = False) -> DeviceData:
    """Load the real set (or the synthetic one) and move it to ``device`` once, as uint8.

    ``val_split``: the last ``validation_images`` training images (in the official order) become
    the validation set and are not trained on: a fixed split, the same for every run and seed,
    disjoint from the training images, for choices that must not look at the test set."""
    device = torch.device(device)
    if synthetic:
        arrays = synthetic_cifar()
        source = "synthetic"
    else:
        *arrays, batches = load_cifar10(data_dir, download=download)
        source = str(batches)
    tx, ty, vx, vy = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays)
    if not val_split:
        return DeviceData(tx, ty, vx, vy, source)
    n_train = tx.shape[0] - validation_images(tx.shape[0])
    return DeviceData(tx[:n_train], ty[:n_train], vx, vy, source,
                      val_x=tx[n_train:], val_y=ty[n_train:])


class TrainBatches:
    """One pass over the training set per ``iter()``: shuffled, augmented, normalised batches.

    ``batch_size`` is the global batch. Under DDP (``world_size`` > 1) every rank draws the same
    permutation and augmentation codes from identically seeded generators and keeps its contiguous
    ``batch_size // world_size`` slice of each global batch, so the ranks together see exactly the
    batches of a single-process run. The last incomplete batch is dropped (390 steps of 128 images
    per epoch on CIFAR-10; 164 epochs are then 63,960 steps, the paper's 64k), so every step has the
    same batch size, which keeps BatchNorm statistics and DDP shards uniform; a different 80 images
    are left out each epoch.
    """

    def __init__(self, data: DeviceData, batch_size: int, generator: torch.Generator,
                 normalizer: Normalizer, augment: bool = True, rank: int = 0, world_size: int = 1,
                 max_steps: Optional[int] = None):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        n = data.train_x.shape[0]
        if n < batch_size:
            raise ValueError(f"batch size {batch_size} exceeds the {n} training images")
        self.data, self.batch_size, self.generator = data, batch_size, generator
        self.normalizer, self.augment = normalizer, augment
        self.rank, self.world_size = rank, world_size
        self.local = batch_size // world_size
        steps = n // batch_size
        self.steps = min(steps, max_steps) if max_steps else steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        dev = self.data.device
        n = self.data.train_x.shape[0]
        # Everything random for the epoch is drawn here, so the generator's state after an epoch
        # does not depend on how many steps were actually consumed.
        perm = torch.randperm(n, generator=self.generator, device=dev)
        codes = draw_augmentation(n, self.generator, dev)
        lo = self.rank * self.local
        for s in range(self.steps):
            start = s * self.batch_size + lo
            idx = perm[start:start + self.local]
            x = self.data.train_x.index_select(0, idx)
            if self.augment:
                x = crop_flip(x, codes[start:start + self.local])
            yield self.normalizer(x), self.data.train_y.index_select(0, idx)


def eval_batches(data: DeviceData, batch_size: int, normalizer: Normalizer, rank: int = 0,
                 world_size: int = 1, split: str = "test"
                 ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The test set (``split="val"``: the validation set) in order, normalised, no augmentation;
    rank r takes the r-th contiguous shard."""
    images, labels = (data.test_x, data.test_y) if split == "test" else (data.val_x, data.val_y)
    if images is None:
        raise ValueError(f"no {split} images: load the data with val_split=True")
    n = images.shape[0]
    lo, hi = (rank * n) // world_size, ((rank + 1) * n) // world_size
    for start in range(lo, hi, batch_size):
        end = min(start + batch_size, hi)
        yield normalizer(images[start:end]), labels[start:end]


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """The data pipeline's generator on ``device``, seeded from the run's seed."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def steps_per_epoch(n_train: int, batch_size: int, max_steps: Optional[int] = None) -> int:
    """Optimizer steps per epoch (the last incomplete batch is dropped)."""
    steps = n_train // batch_size
    return min(steps, max_steps) if max_steps else steps


__all__ = [
    "BATCHES_DIR", "CIFAR10_MEAN", "CIFAR10_STD", "CLASSES", "DEFAULT_DATA_DIR", "DeviceData",
    "ENV_VAR", "Normalizer", "TrainBatches", "crop_flip", "draw_augmentation", "eval_batches",
    "candidate_dirs", "find_batches_dir", "load_cifar10", "load_device_data", "make_generator",
    "read_batch", "resolve_data_dir", "steps_per_epoch", "synthetic_cifar", "validation_images",
    "VAL_IMAGES",
]
