"""Run folders as bookkeeping: setup and file-system errors exit 2 with one line, a run folder is
locked while it trains, a dead run reads as interrupted, SIGTERM/SIGHUP stop a run like Ctrl-C,
and resume refusals name only what differs.

Runs use ResNet-8 on the synthetic set for one or two steps.
"""
import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common import cli, config, runs, sweep, train
from common.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
FP32_SCRIPT = ROOT / "FP32" / "train_cifar10_fp32.py"
SMOKE = ["--synthetic", "--model", "resnet8", "--batch-size", "64", "--device", "cpu",
         "--epochs", "1", "--max-steps-per-epoch", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def make_config(runs_dir, *flags, name="t", format=None):
    args = cli.parse_args(cli.build_parser("test"), [*SMOKE, "--runs-dir", str(runs_dir),
                                                     "--name", name, *flags])
    return cli.make_config(args, label="test", format=format or {"name": "fp32"}, script="tests")


def load_fp32_script():
    spec = importlib.util.spec_from_file_location("fp32_script", FP32_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def exit_code(fn, argv=None):
    with pytest.raises(SystemExit) as e:
        cli.run_main(fn, argv)
    return e.value.code


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


# ---------------------------------------------------------------------------------------------
# A. File-system and setup errors: exit 2, one line saying what to do
# ---------------------------------------------------------------------------------------------
def test_runs_dir_that_is_a_file_exits_2_with_one_line(tmp_path, capsys):
    not_a_folder = tmp_path / "runs"
    not_a_folder.write_text("a file")
    fp32 = load_fp32_script()
    assert exit_code(fp32.main, [*SMOKE, "--runs-dir", str(not_a_folder)]) == 2
    line = one_error_line(capsys)
    assert "cannot create the run folder" in line and str(not_a_folder) in line
    assert "Not a directory" in line and "--runs-dir" in line


def test_read_only_runs_dir_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    def read_only(self, *args, **kwargs):         # tests may run as root, which chmod cannot stop
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    fp32 = load_fp32_script()
    assert exit_code(fp32.main, [*SMOKE, "--runs-dir", str(tmp_path / "ro")]) == 2
    line = one_error_line(capsys)
    assert "Read-only file system" in line and "pass a writable folder as --runs-dir" in line


def test_other_file_system_errors_exit_2_with_one_line(capsys):
    """An OSError no layer turned into a message (a path, permissions) is still not a bug: one
    line naming the file, exit 2."""
    def main(argv):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/somewhere/file")

    assert exit_code(main) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: /somewhere/file: Permission denied") and "permissions" in line


def test_disk_full_while_writing_last_pt_exits_2_and_resumes(tmp_path, capsys, monkeypatch):
    """The checkpoint of epoch 2 hits a full disk: one line naming the file, the epoch kept and
    what to do; no temporary file is left; once there is space, --resume finishes the run."""
    argv = [*SMOKE, "--epochs", "3", "--runs-dir", str(tmp_path), "--name", "full"]
    real_fsync, checkpoints = os.fsync, []

    def fsync(fd):
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            checkpoints.append(fd)
            if len(checkpoints) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fp32 = load_fp32_script()
    assert exit_code(fp32.main, argv) == 2
    line = one_error_line(capsys)
    last_pt = tmp_path / "full" / "last.pt"
    assert f"cannot write {last_pt}: No space left on device" in line
    assert "last.pt keeps epoch 1" in line and "rerun with --resume" in line
    assert not list(last_pt.parent.glob(".*tmp"))
    assert runs.load_checkpoint(last_pt)["epoch"] == 1
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert exit_code(fp32.main, [*argv, "--resume"]) == 0
    assert runs.read_summary(last_pt.parent)["status"] == "finished"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_is_refused_before_any_process_group(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "_setup_distributed",
                        lambda spec: pytest.fail("process group first"))
    with pytest.raises(UserError, match="--device cuda: no CUDA device"):
        train.run(make_config(tmp_path, "--device", "cuda"))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_under_torchrun_is_one_line_from_rank_0(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(FP32_SCRIPT), *SMOKE[:-6], "--device", "cuda", "--runs-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert ours == [ours[0]], r.stderr
    assert ours[0].startswith("error: --device cuda: no CUDA device"), r.stderr
    assert "NCCL" not in r.stderr and "init_process_group" not in r.stderr, r.stderr
    assert "exitcode  : 2" in r.stderr                       # torchrun's report of both ranks


def test_corrupt_checkpoint_names_the_file_and_the_choices(tmp_path):
    train.run(make_config(tmp_path))
    last_pt = tmp_path / "t" / "last.pt"
    last_pt.write_bytes(os.urandom(4096))
    with pytest.raises(UserError) as e:
        train.run(make_config(tmp_path, "--resume"))
    msg = str(e.value)
    assert str(last_pt) in msg and "--overwrite" in msg and "delete the file" in msg
    assert "weights_only" not in msg and "issue" not in msg and "\n" not in msg


def test_resume_mismatch_names_only_the_differing_keys(tmp_path):
    def fp8(weight):
        return {"family": "fp8", "bits_per_element": 8,
                "weight": {"fmt": weight, "rounding": "nearest", "scaling": "tensor"},
                "act": {"fmt": "e4m3", "rounding": "nearest", "scaling": "none"}}

    train.run(make_config(tmp_path, format=fp8("e4m3")))
    with pytest.raises(UserError) as e:
        train.run(make_config(tmp_path, "--resume", "--lr", "0.05", format=fp8("e5m2")))
    msg = str(e.value)
    assert "format.weight.fmt 'e5m2' (checkpoint: 'e4m3')" in msg
    assert "--lr 0.05 (checkpoint: 0.1)" in msg
    assert "act" not in msg and "rounding" not in msg
    assert "scaling" not in msg and "family" not in msg
    assert "\n" not in msg


def test_resume_without_last_pt_refuses_to_replace_trained_epochs(tmp_path):
    """--resume where last.pt is gone but epochs were trained (a deleted checkpoint) does not
    start over in their place: it says so and names --overwrite; a run stopped in its first
    epoch (nothing trained) still starts fresh, as the sweep needs."""
    train.run(make_config(tmp_path))
    (tmp_path / "t" / "last.pt").unlink()
    with pytest.raises(UserError, match=r"holds a run with 1/1 epochs \(status finished\) but no "
                                        r"last.pt to resume from; pass --overwrite"):
        train.run(make_config(tmp_path, "--resume", "--lr", "0.5"))
    assert runs.read_summary(tmp_path / "t")["config"]["lr"] == 0.1        # untouched
    runs.write_json(tmp_path / "t" / "summary.json",
                    runs.read_summary(tmp_path / "t") | {"status": "interrupted", "epochs_done": 0})
    assert train.run(make_config(tmp_path, "--resume"))["status"] == "finished"


def test_a_stop_during_the_checkpoint_write_counts_no_unsaved_epoch(tmp_path, monkeypatch):
    """Stopped while last.pt of epoch 2 is written: the summary says 1 epoch done, as last.pt
    does. Stopped after the last epoch's last.pt but before metrics.jsonl: the resume finds the
    run finished and completes metrics.jsonl; predictions.json was already written."""
    real_save, saves = runs.save_checkpoint, []

    def stop_at(n):
        def save(path, state):
            saves.append(state["epoch"])
            if len(saves) == n:
                raise KeyboardInterrupt
            return real_save(path, state)
        return save

    monkeypatch.setattr(runs, "save_checkpoint", stop_at(2))
    with pytest.raises(KeyboardInterrupt):
        train.run(make_config(tmp_path, "--epochs", "2", name="a"))
    s = runs.read_summary(tmp_path / "a")
    assert (s["status"], s["epochs_done"]) == ("interrupted", 1)
    assert runs.load_checkpoint(tmp_path / "a" / "last.pt")["epoch"] == 1

    real_jsonl, writes = runs.write_jsonl, []

    def stop_metrics(path, rows):
        writes.append(len(rows))
        if len(rows) == 2:
            raise KeyboardInterrupt
        return real_jsonl(path, rows)

    monkeypatch.setattr(runs, "save_checkpoint", real_save)
    monkeypatch.setattr(runs, "write_jsonl", stop_metrics)
    with pytest.raises(KeyboardInterrupt):
        train.run(make_config(tmp_path, "--epochs", "2", name="b"))
    assert (tmp_path / "b" / "predictions.json").is_file()
    assert runs.load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 2
    monkeypatch.setattr(runs, "write_jsonl", real_jsonl)
    done = train.run(make_config(tmp_path, "--epochs", "2", "--resume", name="b"))
    assert done["status"] == "finished" and done["epochs_done"] == 2
    assert len(runs.read_jsonl(tmp_path / "b" / "metrics.jsonl")) == 2


def test_resume_with_another_eval_batch_size_is_refused_and_compile_is_noted(tmp_path, capsys):
    """Per-tensor activation scales are taken per test batch, so --eval-batch-size is part of
    the experiment; --compile may change on resume, with a line saying it is not bit for bit."""
    train.run(make_config(tmp_path, "--epochs", "2", name="e"))
    (tmp_path / "e" / "summary.json").unlink()
    ckpt = runs.load_checkpoint(tmp_path / "e" / "last.pt")
    ckpt["epoch"], ckpt["metrics"] = 1, ckpt["metrics"][:1]
    runs.save_checkpoint(tmp_path / "e" / "last.pt", ckpt)
    with pytest.raises(UserError, match=r"--eval-batch-size 7 \(checkpoint: 1000\)"):
        train.run(make_config(tmp_path, "--epochs", "2", "--resume", "--eval-batch-size", "7",
                              name="e"))
    ckpt["config"]["compile"] = True                    # as if epoch 1 had run compiled
    runs.save_checkpoint(tmp_path / "e" / "last.pt", ckpt)
    capsys.readouterr()
    assert train.run(make_config(tmp_path, "--epochs", "2", "--resume",
                                 name="e"))["epochs_done"] == 2
    assert "note: resuming without --compile" in capsys.readouterr().out


def test_a_checkpoint_of_older_code_resumes_and_its_run_is_reused_by_the_sweep(tmp_path):
    """A config written before a flag existed (here: no ema_decay, label_smoothing) ran as the
    flag's default: --resume continues it and the sweep reuses it, with today's defaults;
    today's non-default value for the flag is still a difference."""
    train.run(make_config(tmp_path, "--epochs", "2", name="old"))
    (tmp_path / "old" / "summary.json").unlink()
    ckpt = runs.load_checkpoint(tmp_path / "old" / "last.pt")
    ckpt["epoch"], ckpt["metrics"] = 1, ckpt["metrics"][:1]
    for key in ("ema_decay", "label_smoothing"):
        del ckpt["config"][key]
    runs.save_checkpoint(tmp_path / "old" / "last.pt", ckpt)
    with pytest.raises(UserError, match=r"--ema-decay 0.5 \(checkpoint: 0.0\)"):
        train.run(make_config(tmp_path, "--epochs", "2", "--resume", "--ema-decay", "0.5",
                              name="old"))
    assert train.run(make_config(tmp_path, "--epochs", "2", "--resume",
                                 name="old"))["epochs_done"] == 2
    stored = runs.read_summary(tmp_path / "old")["config"]
    del stored["ema_decay"]
    args = cli.parse_args(cli.build_parser("t"), [*SMOKE, "--epochs", "2"])
    assert sweep.config_differences(stored, sweep.expected_config(args, 0)) == []


@pytest.mark.parametrize("flags,needle", [(["--seed", "-1"], "--seed must be in 0..4294967295"),
                                          (["--seed", str(2**32)], "--seed must be in"),
                                          (["--lr", "inf"], "--lr must be > 0 and finite"),
                                          (["--weight-decay", "inf"], "--weight-decay must be")])
def test_out_of_range_numbers_are_one_line(flags, needle, tmp_path, capsys):
    """One error line, no usage block, no traceback, no run folder."""
    fp32 = load_fp32_script()
    assert exit_code(fp32.main, [*SMOKE, "--runs-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err and "see " in err and "--help" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("script,flags,needle", [
    ("FP8/train_cifar10_fp8.py", ["--w-fmt", "e9m9"], "accepted"),
    ("Posit/train_cifar10_posit.py", ["--bits", "40"], "--bits"),
    ("FP32/train_cifar10_fp32.py", ["--recipe", "slow"], "invalid choice"),
    ("sweep.py", ["--configs", "fp32", "--gpus", "x"], "--gpus"),
    ("report.py", ["--data", "imaginary"], "invalid choice")])
def test_a_bad_value_is_one_line_not_a_usage_block(script, flags, needle, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / script), *flags, "--runs-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert "usage:" not in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# B. Locks, liveness, signals
# ---------------------------------------------------------------------------------------------
HOLD_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "a+b")
fcntl.flock(f, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def test_run_folder_is_locked_while_it_trains(tmp_path, capsys):
    """Another process holding the run's lock makes a second run on the folder exit 2 (one line);
    the loop holds the lock while it trains and lets go when it ends."""
    run_dir = tmp_path / "locked"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir / runs.LOCK)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert runs.is_locked(run_dir)
        fp32 = load_fp32_script()
        assert exit_code(fp32.main, [*SMOKE, "--runs-dir", str(tmp_path), "--name", "locked"]) == 2
        line = one_error_line(capsys)
        assert f"{run_dir} is being trained by another process" in line and "--name" in line
        assert not (run_dir / runs.SUMMARY).exists()           # nothing was touched
    finally:
        holder.kill()
        holder.wait()
    seen = []
    train.run(make_config(tmp_path, name=run_dir.name),
              after_step=lambda model: seen.append(runs.is_locked(run_dir)))
    train.run(make_config(tmp_path, "--overwrite", name=run_dir.name),    # keeps the lock file
              after_step=lambda model: seen.append(runs.is_locked(run_dir)))
    assert seen == [True, True] and not runs.is_locked(run_dir)


def test_dead_running_run_reads_as_interrupted(tmp_path):
    """A summary left at "running" by a process that is gone: readers say "interrupted", the next
    process on the folder rewrites it so, and a resume continues."""
    train.run(make_config(tmp_path, "--epochs", "2"))
    run_dir = tmp_path / "t"
    summary = json.loads((run_dir / runs.SUMMARY).read_text())
    runs.write_json(run_dir / runs.SUMMARY, summary | {"status": "running"})    # as if killed
    assert runs.read_summary(run_dir, live=False)["status"] == "running"
    live = runs.read_summary(run_dir)
    assert live["status"] == "interrupted" and "--resume" in live["message"]
    with pytest.raises(UserError, match=r"already holds a run \(status interrupted"):
        train.run(make_config(tmp_path, "--epochs", "2"))
    assert json.loads((run_dir / runs.SUMMARY).read_text())["status"] == "interrupted"


def test_sweep_plan_reads_a_dead_run_as_interrupted(tmp_path):
    flags = ["--epochs", "3", "--model", "resnet8"]
    name = sweep.run_name("fp32", "resnet8", 3, 0)
    args = cli.parse_args(cli.build_parser("t"), [*flags, "--seed", "0"])
    runs.write_json(tmp_path / name / runs.SUMMARY,
                    {"status": "running", "epochs_done": 1, "epochs": 3,
                     "config": cli.make_config(args, name=name).to_dict()})
    job, = sweep.plan(["fp32"], [0], flags, tmp_path)
    assert job.action == "run" and job.reason == "resume (interrupted, 1/3 epochs)"


def test_sighup_stops_a_run_like_ctrl_c(tmp_path, capsys):
    config = make_config(tmp_path, "--epochs", "2", "--max-steps-per-epoch", "2")
    hang_up = lambda model: os.kill(os.getpid(), signal.SIGHUP)        # noqa: E731
    before = signal.getsignal(signal.SIGHUP)
    assert exit_code(lambda argv: train.run(config, after_step=hang_up)) == 128 + signal.SIGHUP
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("interrupted (SIGHUP):") and "rerun with --resume" in err[-1]
    summary = runs.read_summary(tmp_path / "t")
    assert summary["status"] == "interrupted" and "SIGHUP" in summary["message"]
    assert signal.getsignal(signal.SIGHUP) == before                   # handler restored


def _start_long_run(tmp_path):
    """The FP32 script on a long synthetic run; returns (process, run folder) once it trains."""
    proc = subprocess.Popen([sys.executable, str(FP32_SCRIPT), *SMOKE[:-4], "--epochs", "10000",
                             "--max-steps-per-epoch", "1", "--runs-dir", str(tmp_path),
                             "--name", "long"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    run_dir = tmp_path / "long"
    deadline = time.monotonic() + 300
    while not (run_dir / runs.METRICS).exists():                     # one epoch done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc, run_dir


@pytest.mark.slow
def test_sigterm_saves_interrupted_and_sigkill_reads_as_interrupted(tmp_path):
    proc, run_dir = _start_long_run(tmp_path / "term")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM == 143, err
    assert err.strip().splitlines()[-1].startswith("interrupted (SIGTERM):")
    summary = json.loads((run_dir / runs.SUMMARY).read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["message"]

    proc, run_dir = _start_long_run(tmp_path / "kill")
    proc.kill()                                                     # no chance to say anything
    proc.communicate(timeout=120)
    assert json.loads((run_dir / runs.SUMMARY).read_text())["status"] == "running"
    assert runs.read_summary(run_dir)["status"] == "interrupted"


# ---------------------------------------------------------------------------------------------
# G. A corrupt summary.json is named as such
# ---------------------------------------------------------------------------------------------
def test_corrupt_summary_is_reported_as_unreadable(tmp_path):
    train.run(make_config(tmp_path))
    path = tmp_path / "t" / runs.SUMMARY
    path.write_text('{"status": "finis')
    summary = runs.read_summary(tmp_path / "t")
    assert summary["status"] == "unreadable" and str(path) in summary["message"]
    assert "corrupt" in summary["message"]
    assert runs.read_summary(tmp_path / "nothing") is None
    with pytest.raises(UserError, match=r"already holds a run \(status unreadable"):
        train.run(make_config(tmp_path))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_files_follow_the_umask(tmp_path, umask):
    """Run files get the mode a plain open() would give (0644 under umask 022), not mkstemp's
    0600."""
    old = os.umask(umask)
    try:
        runs.write_json(tmp_path / "summary.json", {"a": 1})
        runs.save_weights(tmp_path / "weights.pt", {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    for name in ("summary.json", "weights.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_relative_runs_dir_from_a_format_folder_finds_the_repos(tmp_path, monkeypatch):
    """``--runs-dir runs`` typed in FP32/ is the repo's runs/ when there is one (not a new
    FP32/runs/); an existing folder under the current one wins; otherwise it is made here."""
    repo = tmp_path / "repo"
    (repo / "FP32").mkdir(parents=True)
    (repo / "runs").mkdir()
    monkeypatch.setattr(config, "REPO_ROOT", repo)
    monkeypatch.chdir(repo / "FP32")
    assert config.resolve_runs_dir("runs") == repo / "runs"
    assert config.resolve_runs_dir("other") == repo / "FP32" / "other"     # nowhere yet: made here
    (repo / "FP32" / "runs").mkdir()
    assert config.resolve_runs_dir("runs") == repo / "FP32" / "runs"
    assert config.resolve_runs_dir(str(tmp_path / "abs")) == tmp_path / "abs"
    args = cli.parse_args(cli.build_parser("t"), ["--runs-dir", "runs"])
    assert cli.make_config(args, name="x").runs_dir == str(repo / "FP32" / "runs")   # the flag
