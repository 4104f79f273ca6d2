"""Run folders: atomic writes, checkpoints, metrics, provenance (git hash, torch version).

Layout of ``runs/<name>/`` (written by rank 0 only):

* ``config.json``   resolved RunConfig + what was resolved at start (device, layout, data source),
                    git hash, torch/python versions, command line.
* ``metrics.jsonl`` one JSON object per finished epoch.
* ``summary.json``  status ("running" | "finished" | "diverged" | "interrupted" | "failed") and
                    the headline figures; rewritten after every epoch.
* ``predictions.json`` the final model's predicted class of every test image (test-set order),
                    whether it was right, and a hash of the test labels: what paired comparisons
                    between runs need (``report``), without the checkpoint.
* ``weights.pt``    the finished model's ``state_dict`` alone (float32, contiguous, on the CPU; no
                    optimizer state), written at the last epoch, loadable with
                    ``torch.load(weights_only=True)``; its sha256 is in ``summary.json``. A record
                    keeps it, so a new test set, a corruption benchmark or a PTQ row never needs a
                    retrain (``evaluate.py``, ``ptq_eval.py``).
* ``last.pt``       checkpoint after the last finished epoch (model, optimizer, grad scaler, epoch,
                    every RNG state, metrics so far).
* ``.lock``         empty file whose ``flock`` the training process holds for the run's life: a
                    second process on the same folder is refused, and a summary that says
                    "running" while nobody holds the lock belongs to a dead process (read as
                    "interrupted"). The file's presence alone means nothing.

Every file is written to a temporary name in the same folder and moved into place with
``os.replace`` (atomic on POSIX), so a crash or Ctrl-C mid-write never leaves a half-written
checkpoint or summary: the previous version stays. A write that fails (disk full, read-only
folder) raises ``RunFileError``, one line naming the file and what to do.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import RunFileError, UserError

CHECKPOINT = "last.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PREDICTIONS = "predictions.json"
WEIGHTS = "weights.pt"
LOCK = ".lock"
# The small files of a run that results/runs/<name>/ keeps (never the checkpoint).
RECORD_FILES = (CONFIG, METRICS, SUMMARY, PREDICTIONS, WEIGHTS)
CHECKPOINT_VERSION = 1


# What to do about a failed write, by errno (the rest get the system's words only).
_WRITE_ADVICE = {
    errno.ENOSPC: "free some disk space or write elsewhere",
    errno.EDQUOT: "free some of your disk quota or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "the folder is not writable for you: write elsewhere",
    errno.EPERM: "the folder is not writable for you: write elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a folder: write elsewhere",
}


def os_error_text(e: OSError) -> str:
    """``strerror (advice)`` for an OSError: the system's words and what to do, on one line."""
    advice = _WRITE_ADVICE.get(e.errno)
    return f"{e.strerror or e}" + (f" ({advice})" if advice else "")


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, _file_mode())      # mkstemp makes 0600; run files are as readable as others
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise RunFileError(f"cannot write {path}: {os_error_text(e)}") from None
        raise


def jsonable(obj: Any) -> Any:
    """``obj`` as JSON would give it back (tuples -> lists, unknown objects -> str): the form in
    which configs are stored in checkpoints (loadable with ``weights_only``) and compared."""
    return json.loads(json.dumps(obj, default=str))


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()
    _atomic_write(path, lambda f: f.write(data))


def read_json(path: Path) -> Optional[Any]:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_summary(run_dir: Path, live: bool = True) -> Optional[Dict[str, Any]]:
    """A run's ``summary.json``, None when the run has none.

    A file that cannot be read or is not a JSON object gives ``{"status": "unreadable",
    "message": ...}`` naming the file, so callers show that instead of "no summary". With
    ``live``, a status "running" whose process is gone (nobody holds the run's lock) reads as
    "interrupted", with a message saying so.
    """
    path = Path(run_dir) / SUMMARY
    try:
        with open(path) as f:
            summary = json.load(f)
        if not isinstance(summary, dict):
            raise ValueError(f"a JSON {type(summary).__name__}, not an object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) else f"corrupt JSON: {e}"
        return {"status": "unreadable", "message": f"{path} is unreadable ({reason}); "
                                                   f"delete it, or rerun the run with --resume"}
    if live and summary.get("status") == "running" and not is_locked(run_dir):
        summary["status"] = "interrupted"
        summary["message"] = DEAD_RUN_MESSAGE
    return summary


DEAD_RUN_MESSAGE = ("the process training it stopped without recording why (killed, crashed or "
                    "the machine went down); rerun with --resume to continue from last.pt")


def lock_run(run_dir: Path) -> IO[bytes]:
    """Create ``run_dir`` and take the exclusive lock of its ``.lock`` file for this process.

    Returns the open lock file: the lock lasts until it is closed (or the process ends, however it
    ends). Raises ``UserError`` when the folder cannot be made or another process holds the lock.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+b")
    except OSError as e:
        raise UserError(f"cannot create the run folder {run_dir}: {e.strerror or e}; pass a "
                        f"writable folder as --runs-dir") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().decode(errors="replace").strip()
        f.close()
        raise UserError(f"{run_dir} is being trained by another process"
                        f"{f' (pid {holder})' if holder else ''}: wait for it to end or stop it, "
                        f"or pass another --name") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n".encode())          # who holds it, for the message above
    f.flush()
    return f


def remove_if_empty(run_dir: Path) -> None:
    """Remove ``run_dir`` if it holds nothing but its ``.lock`` file (a run that wrote nothing)."""
    run_dir = Path(run_dir)
    try:
        if [p.name for p in run_dir.iterdir()] == [LOCK]:
            (run_dir / LOCK).unlink()
            run_dir.rmdir()
    except OSError:                 # gone already, or something arrived meanwhile: leave it
        pass


def is_locked(run_dir: Path) -> bool:
    """Whether a process (this one included, through another open file) holds the run's lock."""
    try:
        f = open(Path(run_dir) / LOCK, "rb")
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def clear_run_dir(run_dir: Path) -> None:
    """Delete everything in ``run_dir`` but its lock file (``--overwrite``; the caller holds the
    lock, which must outlive the old files)."""
    for child in Path(run_dir).iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def write_jsonl(path: Path, rows: Iterable[Dict[str, Any]]) -> None:
    """Rewrite ``path`` with one JSON object per line, atomically."""
    data = "".join(json.dumps(r, default=str) + "\n" for r in rows).encode()
    _atomic_write(path, lambda f: f.write(data))


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """The objects of a JSON-lines file ([] when missing)."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def labels_digest(labels: Sequence[int]) -> str:
    """A short hash of the test labels: runs compared image by image must share it."""
    return hashlib.sha256(bytes(int(v) for v in labels)).hexdigest()[:16]


def write_predictions(run_dir: Path, predictions: Sequence[int], labels: Any) -> None:
    """``predictions.json``: predicted classes and right/wrong as digit strings (one per image)."""
    labels = [int(v) for v in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} test images")
    write_json(Path(run_dir) / PREDICTIONS, {
        "test_images": len(labels),
        "labels_sha256": labels_digest(labels),
        "predicted": "".join(str(int(p)) for p in predictions),
        "correct": "".join("1" if int(p) == y else "0" for p, y in zip(predictions, labels)),
    })


def read_correct(run_dir: Path) -> Optional[Tuple[str, np.ndarray]]:
    """(labels hash, 0/1 array of right answers per test image) of a run, or None."""
    pred = read_json(Path(run_dir) / PREDICTIONS)
    try:
        correct = np.frombuffer(pred["correct"].encode(), dtype=np.uint8) - ord("0")
        return pred["labels_sha256"], correct.astype(np.int8)
    except (TypeError, KeyError, AttributeError):
        return None


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_weights(path: Path, state_dict: Mapping[str, torch.Tensor]) -> str:
    """Write a model's ``state_dict`` as ``weights.pt`` (contiguous CPU copies: a channels-last or
    GPU model's file loads anywhere), atomically; returns the file's sha256."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = bytes(buffer.getbuffer())
    _atomic_write(path, lambda f: f.write(data))
    return hashlib.sha256(data).hexdigest()


def load_weights(path: Path, sha256: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The ``state_dict`` in a ``weights.pt``, loaded with ``weights_only=True``. A missing,
    corrupt or foreign file, or one whose sha256 is not ``sha256``, raises UserError naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read weights {path}: {e.strerror or e}") from None
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"weights {path} do not match their record: sha256 "
                        f"{hashlib.sha256(data).hexdigest()[:16]}..., the summary says "
                        f"{sha256[:16]}... (a changed or damaged file)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"weights {path} are not a readable state_dict ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no details'})") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"weights {path} are not a model state_dict (a dict of named tensors)")
    return state


def ensure_weights(run_dir: Path) -> Optional[str]:
    """The sha256 of a finished run's ``weights.pt``, writing it first from ``last.pt``'s model
    when a run finished by older code has none (and noting it in ``summary.json``); None when the
    run is not finished or has neither file."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / SUMMARY) or {}
    if summary.get("status") != "finished":
        return None
    weights = run_dir / WEIGHTS
    if weights.is_file():
        sha = file_sha256(weights)
    elif (run_dir / CHECKPOINT).is_file():
        ckpt = load_checkpoint(run_dir / CHECKPOINT)
        if ckpt.get("epoch") != summary.get("epochs_done"):
            return None
        sha = save_weights(weights, ckpt["model"])
    else:
        return None
    if summary.get("weights_sha256") != sha:
        write_json(run_dir / SUMMARY, {**summary, "weights_file": WEIGHTS, "weights_sha256": sha})
    return sha


def copy_record(run_dir: Path, record_dir: Path) -> None:
    """Copy a finished run's small files (``RECORD_FILES``, never the checkpoint) to
    ``record_dir``, each atomically, the summary last (its presence marks the record complete).
    A finished run without ``weights.pt`` gets it from ``last.pt`` first (``ensure_weights``)."""
    ensure_weights(run_dir)
    order = [f for f in RECORD_FILES if f != SUMMARY] + [SUMMARY]
    for name in order:
        src = Path(run_dir) / name
        if src.is_file():
            data = src.read_bytes()
            _atomic_write(Path(record_dir) / name, lambda f: f.write(data))


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then ``os.replace``: last.pt is always a whole
    checkpoint.

    The checkpoint is serialised in memory first: torch's writer turns a failed file write (disk
    full) into a RuntimeError without the errno, a plain write keeps it for ``RunFileError``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    _atomic_write(path, lambda f: f.write(data))


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` (tensors and plain Python types only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def rng_state(data_generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """Every random state a run uses, in checkpoint-safe types (tensors, lists, ints)."""
    np_state = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "data": data_generator.get_state() if data_generator is not None else None,
    }
    return state


def set_rng_state(state: Dict[str, Any], data_generator: Optional[torch.Generator] = None) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch_cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if data_generator is not None and state.get("data") is not None:
        data_generator.set_state(state["data"])


def git_info(root: Path) -> Dict[str, Any]:
    """Commit hash of ``root`` and whether tracked files differ from it (None when not a git
    repo)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"hash": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"hash": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"hash": None, "dirty": None}
