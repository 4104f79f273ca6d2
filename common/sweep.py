"""Sweeps: a named set of configurations x N seeds, each run exactly as a user would run it by hand.

    python sweep.py                                    # the seed set, 3 seeds, the paper's schedule
    python sweep.py --set smoke --seeds 1 --synthetic --epochs 1 --max-steps-per-epoch 2
    python sweep.py --configs fp32,posit8 --epochs 30 --data-dir ../shared/cifar10
    python sweep.py --list

Every (configuration, seed) is a subprocess of its format script::

    python <script> <config flags> <training flags> --seed S --runs-dir DIR --name NAME --resume

so a sweep's run is bit for bit the run a user gets from that command. Training flags (the
shared-loop flags of ``common.cli``: ``--epochs``, ``--model``, ``--data-dir`` ...) pass through
to every run; they are checked with the shared parser before anything starts, so a typo fails at
once instead of after hours of runs.

Run names are ``<key>_<model>_<recipe>_e<epochs>_s<seed>`` (plus ``_synthetic``, ``_max<N>`` for
smoke runs, ``_val`` with ``--val-split`` and ``_<tag>`` with ``--tag``), so sweeps of different
lengths never share a folder.
Before launching, a run's ``summary.json`` decides (its record in ``--records-dir`` first, else its
run folder):

* ``finished``: skipped without starting a process (a second sweep does no work at all);
* ``diverged``: skipped too: a divergence is a result (the report lists it); delete the folder and
  its record to try again;
* anything else (no folder, ``running``/``interrupted``/``failed``): launched with ``--resume``,
  which continues ``last.pt`` exactly or starts fresh when there is none.

Finished and diverged runs are recorded (their small files and final weights copied to
``--records-dir``); one that is not yet (a sweep with ``--records-dir none``, a run made by hand
under the sweep's name), or whose record has no weights while its run folder has them (or a
``last.pt`` to take them from), is recorded when the sweep skips it.

An existing run whose recorded training flags differ from this sweep's (say ``--lr``), or that was
scored on other test images than this sweep's data holds (the 1,000-image subset against the full
10,000), is refused before anything starts (exit 2): reusing it would mix two experiments under
one name.

Several GPUs (``torch.cuda.device_count() > 1``, or ``--gpus 0,1,...``): one run per GPU at a time,
in parallel, each subprocess seeing only its GPU (``CUDA_VISIBLE_DEVICES``). Otherwise the runs go
one after another. Each run's output is appended to ``runs/<name>/stdout.log`` (and streamed to the
terminal when the runs are sequential).

Outcomes per run: finished, skipped, diverged (the script's exit 1; the sweep goes on), failed
(any other exit code; the sweep goes on), interrupted (Ctrl-C, or SIGTERM/SIGHUP sent to the sweep
and passed on to the running run: the sweep stops and prints its summary). Exit code of the
sweep: 0 when nothing failed, 1 when some run failed, 2 for bad flags or conflicting runs, 130 on
Ctrl-C, 128 + the signal's number on SIGTERM/SIGHUP.
"""
from __future__ import annotations

import argparse
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from . import cli, config, data, runs
from .config import COMPARED_EXCLUDE, CONFIGS, SweepConfig, compared_values  # noqa: F401
from .errors import UserError

REPO_ROOT = config.REPO_ROOT


# Named sets of configuration keys. "seed" is the README's seed set: every format once.
SETS: Dict[str, Tuple[str, ...]] = {
    "seed": ("fp32", "bf16", "fp8-e5m2w", "fp8-e4m3w", "fp4", "posit4", "posit8", "posit16"),
    "smoke": ("fp32", "fp8-e4m3w"),
    "fp4-all": ("fp32", "fp4", "fp4-mx", "fp4-nv"),   # the FP4 script's three configurations
    # GEMM mode (docs/gemm.md), each beside the tensor-role row it is compared with
    "gemm": ("fp8-e4m3w", "fp8-te-gemm", "fp8-te-gemm-acc16", "fp4-nv-fl", "fp4-nv-gemm-fl",
             "fp4-nv", "fp4-nv-gemm", "fp4-mx", "fp4-mx-gemm"),
    "all": tuple(CONFIGS),
}

DEFAULT_SET = "seed"
DEFAULT_RECORDS_DIR = REPO_ROOT / "results" / "runs"
# Records scored on the first 1,000 test images only (the test file held no more until 2026-12):
# kept as history, read by the report beside the full-test-set records, never resumed by a sweep.
HISTORY_RECORDS_DIR = REPO_ROOT / "results" / "runs-test1k"
DEFAULT_SEEDS = 3
LOG_NAME = "stdout.log"

# Training flags the sweep sets itself (per run), so they may not be passed through.
OWN_FLAGS = {"seed": "--seeds", "name": "--tag", "runs_dir": "--runs-dir", "resume": None,
             "overwrite": None}

# Exit codes of the scripts (common.cli.run_main).
EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130
# 128 + SIGHUP, SIGINT, SIGTERM (the scripts' handled stops), or killed by SIGINT/SIGTERM
INTERRUPTED_CODES = (129, EXIT_INTERRUPTED, 143, -2, -15)


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One (configuration, seed) of a sweep and what became of it."""

    key: str
    seed: int
    name: str
    cmd: List[str]
    run_dir: Path
    action: str = "run"          # run | skip
    reason: str = ""             # why skipped / how a launched run started
    result: str = ""             # finished | skipped | diverged | failed | interrupted
    returncode: Optional[int] = None
    seconds: float = 0.0
    final_test_acc: Optional[float] = None
    message: str = ""
    record_dir: Optional[Path] = None    # where the finished run's small files are kept
    record_now: bool = False             # finished or diverged, but not recorded yet

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_NAME


def run_name(key: str, model: str, epochs: int, seed: int, synthetic: bool = False,
             max_steps: Optional[int] = None, tag: Optional[str] = None,
             recipe: str = config.DEFAULT_RECIPE, val_split: bool = False) -> str:
    """``<key>_<model>_<recipe>_e<epochs>_s<seed>[_synthetic][_val][_max<N>][_<tag>]``: what makes
    a run distinct (as the scripts' own names)."""
    name = f"{key}_{model}_{recipe}_e{epochs}_s{seed}"
    if synthetic:
        name += "_synthetic"
    if val_split:
        name += "_val"
    if max_steps:
        name += f"_max{max_steps}"
    if tag:
        name += f"_{tag}"
    return name


def resolve_configs(set_name: Optional[str], config_keys: Optional[str]) -> List[str]:
    """The configuration keys to run: ``--configs a,b`` if given, else the keys of ``--set``."""
    if config_keys:
        keys = [k.strip() for k in config_keys.split(",") if k.strip()]
        bad = [k for k in keys if k not in CONFIGS]
        if bad or not keys:
            raise UserError(f"--configs: unknown configuration "
                            f"{', '.join(bad) or repr(config_keys)}; "
                            f"accepted: {', '.join(CONFIGS)} (see --list)")
        return list(dict.fromkeys(keys))
    name = set_name or DEFAULT_SET
    if name not in SETS:
        raise UserError(f"--set {name!r}: unknown set; accepted: {', '.join(SETS)} (see --list)")
    return list(SETS[name])


def training_parser() -> argparse.ArgumentParser:
    """The shared training parser of the scripts, with errors raised as UserError (one line)."""
    parser = cli.build_parser("training flags passed through by the sweep", prog="sweep.py")

    def error(message):
        if message.startswith("unrecognized arguments"):
            message += (" (a format flag belongs in a configuration: pick one with --configs, "
                        "or add one to CONFIGS in common/config.py)")
        raise UserError(f"training flags: {message}")

    parser.error = error            # argparse and cli.parse_args report through parser.error
    return parser


def parse_training_flags(flags: Sequence[str]) -> argparse.Namespace:
    """Check the pass-through flags with the scripts' own shared parser (bad ones: UserError)."""
    flags = list(flags)
    if flags and flags[0] == "--":
        flags = flags[1:]
    parser = training_parser()
    option_dest = {}
    for action in parser._actions:
        for opt in action.option_strings:
            option_dest[opt] = action.dest
    for flag in flags:
        dest = option_dest.get(flag.split("=", 1)[0])
        if dest in OWN_FLAGS:
            own = OWN_FLAGS[dest]
            raise UserError(f"{flag.split('=', 1)[0]} is set by the sweep for each run"
                            + (f"; use the sweep's {own}" if own else "")
                            + " (finished runs are skipped, others resumed; delete a run's "
                              "folder to redo it)")
    args = cli.parse_args(parser, flags)
    # an abbreviation (--see 3) gets past the loop above; the values show it
    changed = [own for dest, own in OWN_FLAGS.items()
               if getattr(args, dest) != parser.get_default(dest)]
    if changed:
        raise UserError("training flags: --seed, --name, --runs-dir, --resume and --overwrite are "
                        "set by the sweep for each run; use the sweep's --seeds, --tag, --runs-dir")
    return args


def expected_config(args: argparse.Namespace, seed: int) -> Dict[str, object]:
    """What the shared flags resolve to for one seed, in the JSON form runs store."""
    resolved = cli.make_config(args, name="x", script="-")
    return runs.jsonable(compared_values(resolved.to_dict() | {"seed": seed}))


def config_differences(stored: Mapping, expected: Mapping) -> List[str]:
    """``--flag new (run: old)`` for each compared field that differs (fields a run written by
    older code lacks count as their defaults)."""
    stored = compared_values(runs.jsonable(config.with_defaults(stored)))
    out = []
    for k in sorted(set(stored) | set(expected)):
        if k in expected and stored.get(k) != expected.get(k):
            out.append(f"--{k.replace('_', '-')} {expected.get(k)!r} (run: {stored.get(k)!r})")
    return out


def test_set(args: argparse.Namespace) -> Optional[Tuple[str, int]]:
    """(labels hash, number of images) of the test set the sweep's runs will read, found as they
    find it (a relative ``--data-dir`` from the repo root, where they run); None for synthetic
    data, or data that is not there yet (the first run downloads it) or cannot be read (the run
    says why)."""
    if args.synthetic:
        return None
    path, _ = data.resolve_data_dir(args.data_dir)
    folder = data.find_batches_dir(path if path.is_absolute() else REPO_ROOT / path)
    try:
        labels = data.read_batch(folder / data.TEST_FILE)[1] if folder else None
    except UserError:
        return None
    return None if labels is None else (runs.labels_digest(labels), len(labels))


def _other_test_set(folder: Path, summary: Mapping, current: Tuple[str, int]) -> Optional[str]:
    """Why a run in ``folder`` was scored on other test images than ``current``, or None."""
    scored = runs.read_correct(folder)
    n = summary.get("test_images")
    if (scored is None or scored[0] == current[0]) and (not n or n == current[1]):
        return None
    return (f"{folder} was scored on other test images ({n or len(scored[1]):,}) than this "
            f"sweep's data holds ({current[1]:,})")


def needs_record(job: Job, recorded: bool) -> bool:
    """Whether a finished or diverged run is to be (re-)recorded: it has no record yet, or its
    record, made before records kept weights, has none while the run folder can supply them."""
    if job.record_dir is None:
        return False
    if not recorded:
        return True
    return not (job.record_dir / runs.WEIGHTS).is_file() and any(
        (job.run_dir / f).is_file() for f in (runs.WEIGHTS, runs.CHECKPOINT))


def plan(keys: Sequence[str], seeds: Sequence[int], training_flags: Sequence[str],
         runs_dir: Path, tag: Optional[str] = None,
         records_dir: Optional[Path] = None) -> List[Job]:
    """The jobs of a sweep, seed-major (every configuration of seed 0 first, then seed 1 ...), each
    marked run or skip from its ``summary.json``: the record in ``records_dir/<name>/`` if there
    is one (a finished run kept in the repo is done, whatever ``runs_dir`` holds), else the one in
    ``runs_dir/<name>/``. Existing runs made with other training flags or scored on other test
    images raise UserError (all of them counted in one line)."""
    flags = list(training_flags)
    if flags and flags[0] == "--":
        flags = flags[1:]
    args = parse_training_flags(flags)
    runs_dir = config.resolve_runs_dir(str(runs_dir))
    jobs, conflicts = [], []
    current: List[Optional[Tuple[str, int]]] = []       # test_set(args), read once when needed
    for seed in seeds:
        expected = expected_config(args, seed)
        for key in keys:
            cfg = CONFIGS[key]
            name = run_name(key, args.model, args.epochs, seed, args.synthetic,
                            args.max_steps_per_epoch, tag, args.recipe, args.val_split)
            cmd = [sys.executable, str(REPO_ROOT / cfg.script), *cfg.flags, *flags,
                   "--seed", str(seed), "--runs-dir", str(runs_dir), "--name", name, "--resume"]
            # smoke runs (synthetic data, capped epochs) are never kept as results
            keep = records_dir is not None and not args.synthetic and not args.max_steps_per_epoch
            job = Job(key, seed, name, cmd, runs_dir / name,
                      record_dir=Path(records_dir).expanduser().resolve() / name if keep else None)
            record = (runs.read_json(job.record_dir / runs.SUMMARY) if job.record_dir
                      else None) or {}
            recorded = record.get("status") in ("finished", "diverged")
            folder = job.record_dir if recorded else job.run_dir
            # read_summary: a dead run's "running" reads as interrupted, a corrupt file as
            # unreadable
            summary = record if recorded else runs.read_summary(job.run_dir)
            if summary is not None:
                # an unreadable summary.json has no config: config.json tells, else nothing does
                stored = summary.get("config") or (runs.read_json(folder / runs.CONFIG) or {}).get(
                    "config")
                diffs = config_differences(stored, expected) if stored else []
                if diffs:
                    conflicts.append(f"{folder} was made with other flags: {'; '.join(diffs)}")
                status = summary.get("status")
                if status in ("finished", "diverged"):
                    if not current:
                        current.append(test_set(args))
                    other = current[0] and _other_test_set(folder, summary, current[0])
                    if other:
                        conflicts.append(other)
                    job.action = "skip"
                    job.record_now = needs_record(job, recorded)
                done = f"{summary.get('epochs_done', '?')}/{summary.get('epochs', '?')} epochs"
                if status == "finished":
                    job.reason = "recorded" if recorded else "finished"
                    job.final_test_acc = summary.get("final_test_acc")
                elif status == "diverged":
                    folders = " and ".join(str(d) for d in (job.record_dir, job.run_dir) if d)
                    job.reason = f"diverged after {done}; delete {folders} to retry"
                else:
                    job.reason = f"resume ({status}, {done})"
            else:
                job.reason = "resume" if (job.run_dir / runs.CHECKPOINT).is_file() else "new"
            jobs.append(job)
    if conflicts:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise UserError(f"{conflicts[0]}{more}. Pass the same flags and data, a --tag for a "
                        f"separate sweep, or another --runs-dir (and --records-dir)")
    return jobs


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
class _StopSignals:
    """SIGTERM and SIGHUP to the sweep alone (a job scheduler, a closed terminal) are passed on to
    the running children, which save and stop as on Ctrl-C; no new run starts, and the sweep
    prints its summary. (Ctrl-C reaches the children by itself: they share the process group.)"""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.signum: Optional[int] = None
        self.children: set = set()
        self.lock = threading.Lock()
        self.previous: Dict[int, object] = {}

    def __enter__(self):
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._forward) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _forward(self, signum, frame):
        self.signum = signum
        with self.lock:
            children = list(self.children)
        for proc in children:
            _send(proc, signum)

    def add(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.children.add(proc)
        if self.signum is not None:        # the signal came while this child was starting
            _send(proc, self.signum)

    def remove(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.children.discard(proc)


def _send(proc: subprocess.Popen, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except (ProcessLookupError, OSError):
        pass


_STOPS = _StopSignals()


def _launch(job: Job, gpu: Optional[str], stream: bool, threads: Optional[int] = None) -> int:
    """Run ``job.cmd`` to its end; append its output to the run's stdout.log (and to our stdout
    when ``stream``). ``gpu`` restricts the subprocess to that CUDA device. Returns the exit code.

    On Ctrl-C the child gets the SIGINT too (same process group) and saves its files; we wait for
    it, record its exit code in ``job.returncode`` and re-raise KeyboardInterrupt.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
        if threads:            # parallel runs share the host's cores instead of oversubscribing
            env.setdefault("OMP_NUM_THREADS", str(threads))
    job.run_dir.mkdir(parents=True, exist_ok=True)
    with open(job.log_path, "a", encoding="utf-8") as log:
        log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} sweep: "
                  f"{'CUDA_VISIBLE_DEVICES=' + gpu + ' ' if gpu is not None else ''}"
                  f"{shlex.join(job.cmd)}\n")
        log.flush()
        proc = subprocess.Popen(job.cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        _STOPS.add(proc)
        interrupted = False
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if stream:
                    sys.stdout.write(line)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            interrupted = True
        rc = job.returncode = _wait(proc)
        _STOPS.remove(proc)
        if interrupted:                  # the rest of the child's output (its last words)
            rest = proc.stdout.read()
            log.write(rest)
            if stream:
                sys.stdout.write(rest)
        log.write(f"=== exit code {rc}\n")
    if interrupted:
        raise KeyboardInterrupt
    return rc


def _wait(proc: subprocess.Popen) -> int:
    """Wait for ``proc``, also through repeated Ctrl-C (the child saves its files on the first)."""
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


def _outcome(job: Job, rc: int) -> None:
    """Fill ``job``'s result from the exit code and the run's summary.json."""
    job.returncode = rc
    summary = runs.read_json(job.run_dir / runs.SUMMARY) or {}
    if rc == 0:
        job.result = "finished"
        job.final_test_acc = summary.get("final_test_acc")
        _record(job)
    elif rc == EXIT_DIVERGED:
        job.result = "diverged"
        job.message = summary.get("message", "")
        _record(job)
    elif rc in INTERRUPTED_CODES:
        job.result = "interrupted"
    else:
        job.result = "failed"
        job.message = f"exit code {rc}: see {job.log_path}"
        if rc == 2:
            last = _last_error_line(job.log_path)
            if last:
                job.message = f"{last} (exit 2)"


def _record(job: Job) -> None:
    """Copy a finished or diverged run's small files to its record folder (if it keeps one); a
    record that cannot be written goes into the job's message (the next sweep writes it)."""
    if job.record_dir is None:
        return
    try:
        runs.copy_record(job.run_dir, job.record_dir)
        job.record_now = False
    except (UserError, OSError) as e:
        job.message = (job.message + "; " if job.message else "") + f"record not written: {e}"


def _last_error_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("error:"):
            return line
    return ""


def resolve_gpus(spec: str, training: argparse.Namespace,
                 jobs_per_gpu: int = 1) -> Optional[List[str]]:
    """GPU slots to run on in parallel (a GPU id once per concurrent run on it), or None for one
    run after another.

    ``auto``: every visible GPU when there are more than one, or one GPU with ``jobs_per_gpu`` > 1
    (and the runs may use CUDA); ``none``: sequential; ``0,1,...``: those devices. Each GPU gets
    ``jobs_per_gpu`` runs at a time: ResNet-20 leaves a large GPU mostly idle (its step is bound
    by kernel launches), so several runs share one GPU for more total throughput.
    """
    if jobs_per_gpu < 1:
        raise UserError(f"--jobs-per-gpu {jobs_per_gpu}: give 1 or more")
    if spec == "none":
        if jobs_per_gpu > 1:
            raise UserError("--jobs-per-gpu with --gpus none: the runs go one after another; "
                            "drop one of them")
        return None
    if spec == "auto":
        if training.device == "cpu":
            if jobs_per_gpu > 1:
                raise UserError("--jobs-per-gpu with --device cpu: the runs would use no GPU; "
                                "drop one of them")
            return None
        try:
            import torch
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:                # a broken CUDA set-up: run sequentially, as on a CPU
            n = 0
        if n == 0 and jobs_per_gpu > 1:
            raise UserError("--jobs-per-gpu: no CUDA device is visible; on a CPU the runs go one "
                            "after another")
        ids = [str(i) for i in range(n)] if n > 1 or (n == 1 and jobs_per_gpu > 1) else None
        return None if ids is None else [g for g in ids for _ in range(jobs_per_gpu)]
    ids = [g.strip() for g in spec.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
        raise UserError(f"--gpus {spec!r}: give auto, none, or distinct device numbers like 0,1,2")
    if training.device == "cpu":
        raise UserError("--gpus with --device cpu: the runs would not use the GPUs; "
                        "drop one of them")
    return [g for g in ids for _ in range(jobs_per_gpu)]


@dataclass
class SweepResult:
    jobs: List[Job]
    interrupted: bool = False
    seconds: float = 0.0
    counts: Dict[str, int] = field(default_factory=dict)
    signum: Optional[int] = None        # SIGTERM/SIGHUP that stopped the sweep, if one did

    @property
    def failed(self) -> List[Job]:
        return [j for j in self.jobs if j.result == "failed"]


def execute(jobs: List[Job], gpus: Optional[List[str]] = None,
            out: Callable[[str], None] = print) -> SweepResult:
    """Run the jobs marked "run" (sequentially, or one per GPU in parallel); mark skipped ones.
    SIGTERM/SIGHUP stop it like Ctrl-C (``_StopSignals``)."""
    with _STOPS:
        return _execute(jobs, gpus, out)


def _execute(jobs: List[Job], gpus: Optional[List[str]], out: Callable[[str], None]
             ) -> SweepResult:
    t0 = time.perf_counter()
    todo = [j for j in jobs if j.action == "run"]
    for j in jobs:
        if j.action == "skip":
            j.result = "skipped"
            if j.record_now:
                _record(j)
                j.reason += f"; {j.message}" if j.record_now else f"; recorded in {j.record_dir}"
            out(f"skip ({j.reason}): {j.name}")
    interrupted = False
    if todo:
        where = (f"in parallel on GPU slots {','.join(gpus)}" if gpus else "one after another")
        out(f"sweep: {len(todo)} run{'s' if len(todo) != 1 else ''} to do ({len(jobs) - len(todo)} "
            f"skipped), {where}")
    if gpus:
        interrupted = _execute_parallel(todo, gpus, out)
    else:
        for i, job in enumerate(todo, 1):
            if _STOPS.signum is not None:
                interrupted = True
                break
            out(f"[{i}/{len(todo)}] {job.name} ({job.reason}): {shlex.join(job.cmd)}")
            t = time.perf_counter()
            try:
                rc = _launch(job, None, stream=True)
            except KeyboardInterrupt:
                interrupted = True
                rc = job.returncode if job.returncode is not None else EXIT_INTERRUPTED
            job.seconds = time.perf_counter() - t
            _outcome(job, rc)
            if interrupted or job.result == "interrupted":
                interrupted = True
                if job.result != "finished":
                    job.result = "interrupted"
                break
    for j in jobs:
        if not j.result:
            j.result = "not started"
    interrupted = interrupted or _STOPS.signum is not None
    res = SweepResult(jobs, interrupted, time.perf_counter() - t0, signum=_STOPS.signum)
    for j in jobs:
        res.counts[j.result] = res.counts.get(j.result, 0) + 1
    return res


def _execute_parallel(todo: List[Job], gpus: List[str], out: Callable[[str], None]) -> bool:
    """One worker thread per GPU slot takes the next job; returns True if interrupted. Each run
    gets an equal share of the host's CPU threads (OMP_NUM_THREADS, unless already set)."""
    threads = max(1, (os.cpu_count() or 1) // len(gpus))
    jobs: "queue.Queue[Job]" = queue.Queue()
    for j in todo:
        jobs.put(j)
    lock = threading.Lock()
    stop = threading.Event()

    def say(msg):
        with lock:
            out(msg)

    def worker(gpu):
        while not stop.is_set() and _STOPS.signum is None:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                return
            say(f"[GPU {gpu}] start {job.name} ({job.reason}); log: {job.log_path}")
            t = time.perf_counter()
            try:
                rc = _launch(job, gpu, stream=False, threads=threads)
            except KeyboardInterrupt:        # only the main thread gets it; kept for safety
                rc = job.returncode if job.returncode is not None else EXIT_INTERRUPTED
                stop.set()
            except OSError as e:             # its folder or log cannot be written: this run
                job.seconds = time.perf_counter() - t   # fails, the other slots go on
                job.result = "failed"
                job.message = f"{e.filename or job.run_dir}: {e.strerror or e}"
                say(f"[GPU {gpu}] failed {job.name}: {job.message}")
                continue
            job.seconds = time.perf_counter() - t
            _outcome(job, rc)
            acc = f", test acc {job.final_test_acc:.2f}%" if job.final_test_acc is not None else ""
            say(f"[GPU {gpu}] {job.result} {job.name} ({_hms(job.seconds)}{acc})")
            if job.result == "interrupted":
                stop.set()

    workers = [threading.Thread(target=worker, args=(g,), daemon=True) for g in gpus]
    for t in workers:
        t.start()
    try:
        while any(t.is_alive() for t in workers):
            for t in workers:
                t.join(timeout=0.5)
    except KeyboardInterrupt:
        stop.set()                     # children got the SIGINT too; wait for them to save
        for t in workers:
            while t.is_alive():
                try:
                    t.join()
                except KeyboardInterrupt:
                    pass
    return stop.is_set()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def summary_lines(res: SweepResult) -> List[str]:
    """The one-screen summary printed at the end of a sweep."""
    order = ("finished", "skipped", "diverged", "failed", "interrupted", "not started")
    counts = ", ".join(f"{res.counts[k]} {k}" for k in order if res.counts.get(k))
    lines = [f"sweep summary: {len(res.jobs)} runs: {counts} ({_hms(res.seconds)})"]
    width = max(len(j.name) for j in res.jobs)
    for j in res.jobs:
        acc = f"{j.final_test_acc:6.2f}%" if j.final_test_acc is not None else "      -"
        t = _hms(j.seconds) if j.result not in ("skipped", "not started") else ""
        note = j.reason if j.result == "skipped" else j.message
        lines.append(f"  {j.name:<{width}}  {j.result:<11} {acc}  {t:>8}  {note}".rstrip())
    return lines


def list_lines() -> List[str]:
    """``--list``: the sets and the configurations with their commands."""
    lines = ["sets:"]
    set_width = max(map(len, SETS))
    for name, keys in SETS.items():
        lines.append(f"  {name:<{set_width}}  {', '.join(keys)}")
    lines.append("configurations:")
    width = max(map(len, CONFIGS))
    cmds = {k: f"{c.script} {shlex.join(c.flags)}".rstrip() for k, c in CONFIGS.items()}
    cmd_width = max(map(len, cmds.values()))
    for key, c in CONFIGS.items():
        about = c.about + (f" (against {c.compared_with})" if c.compared_with else "")
        lines.append(f"  {key:<{width}}  {cmds[key]:<{cmd_width}}  # {about}".rstrip(" #"))
    return lines
