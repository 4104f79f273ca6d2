"""sweep.py: runs every (configuration, seed) through its script, skips finished runs without
starting a process, resumes a half-finished run, one run per GPU in parallel, refuses bad flags
and runs made with other flags before starting anything."""
import functools
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from common import cli, runs, sweep, train
from common.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--synthetic", "--epochs", "1", "--max-steps-per-epoch", "2", "--model", "resnet8",
         "--batch-size", "32"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One OpenMP thread in this process and in the runs it starts (shared cores stall)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_entry(name):
    spec = importlib.util.spec_from_file_location(f"{name}_entry", ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def no_launch(*args, **kwargs):
    raise AssertionError("the sweep started a run")


@pytest.mark.slow
def test_sweep_runs_then_does_no_work(tmp_path, capsys, monkeypatch):
    argv = ["--configs", "fp32,fp8-e4m3w", "--seeds", "1", "--runs-dir", str(tmp_path), *SMOKE]
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [sweep.run_name(k, "resnet8", 1, 0, True, 2) for k in ("fp32", "fp8-e4m3w")]
    assert names == ["fp32_resnet8_paper_e1_s0_synthetic_max2",
                     "fp8-e4m3w_resnet8_paper_e1_s0_synthetic_max2"]
    assert "sweep summary: 2 runs: 2 finished" in proc.stdout
    logs = {}
    for name in names:
        s = json.loads((tmp_path / name / "summary.json").read_text())
        assert s["status"] == "finished" and s["config"]["seed"] == 0
        logs[name] = (tmp_path / name / "stdout.log").read_text()
        assert "final test accuracy:" in logs[name]               # the run's output is logged
    fp8 = json.loads((tmp_path / names[1] / "summary.json").read_text())["format"]
    assert ((fp8["weight"]["fmt"], fp8["act"]["fmt"], fp8["first_last_fp32"])
            == ("e4m3", "e4m3", True))

    # again: every run is skipped from its summary.json; no process is started
    monkeypatch.setattr(sweep, "_launch", no_launch)
    entry = load_entry("sweep")
    assert entry.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("skip (finished)") == 2 and "2 skipped" in out
    for name in names:
        assert (tmp_path / name / "stdout.log").read_text() == logs[name]


class StopAt:
    """after_step hook raising KeyboardInterrupt (a Ctrl-C) at the n-th optimizer step."""

    def __init__(self, n):
        self.n, self.count = n, 0

    def __call__(self, model):
        self.count += 1
        if self.count == self.n:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_half_finished_run_is_resumed_not_restarted(tmp_path, capsys, monkeypatch):
    flags = ["--synthetic", "--epochs", "2", "--max-steps-per-epoch", "2", "--model", "resnet8",
             "--batch-size", "32"]
    name = sweep.run_name("fp32", "resnet8", 2, 0, True, 2)
    # the run a sweep would make, stopped by Ctrl-C at the first step of epoch 2
    spec = importlib.util.spec_from_file_location("fp32_script",
                                                  ROOT / "FP32" / "train_cifar10_fp32.py")
    fp32 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fp32)
    monkeypatch.setattr(train, "run", functools.partial(train.run, after_step=StopAt(3)))
    with pytest.raises(KeyboardInterrupt):
        fp32.main([*flags, "--seed", "0", "--runs-dir", str(tmp_path), "--name", name])
    monkeypatch.undo()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = tmp_path / name
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    first_epoch = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(first_epoch) == 1
    capsys.readouterr()

    entry = load_entry("sweep")
    assert entry.main(["--configs", "fp32", "--seeds", "1", "--runs-dir", str(tmp_path),
                       *flags]) == 0
    out = capsys.readouterr().out
    assert "(resume (interrupted, 1/2 epochs))" in out
    assert "resuming after epoch 1" in out and "epoch 1/2" not in out   # epoch 1 was not redone
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and lines[0] == first_epoch[0]
    assert runs.load_checkpoint(run_dir / "last.pt")["epoch"] == 2
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "finished" and s["epochs_done"] == 2


def test_plan_names_skips_and_refuses_runs_made_with_other_flags(tmp_path):
    flags = ["--epochs", "3", "--model", "resnet8"]
    jobs = sweep.plan(["fp32", "posit4"], range(2), flags, tmp_path)
    assert [j.name for j in jobs] == ["fp32_resnet8_paper_e3_s0", "posit4_resnet8_paper_e3_s0",
                                      "fp32_resnet8_paper_e3_s1",
                                      "posit4_resnet8_paper_e3_s1"]   # seed-major
    cmd = jobs[1].cmd
    assert cmd[1] == str(ROOT / "Posit" / "train_cifar10_posit.py")
    assert cmd[2:] == ["--bits", "4", "--es", "0", "--first-last-fp32", *flags, "--seed", "0",
                       "--runs-dir", str(tmp_path.resolve()),
                       "--name", "posit4_resnet8_paper_e3_s0", "--resume"]
    assert all(j.action == "run" and j.reason == "new" for j in jobs)

    def fake_run(name, status, **changes):
        args = cli.parse_args(cli.build_parser("t"), [*flags, "--seed", name[-1]])
        config = cli.make_config(args, name=name).to_dict() | changes
        runs.write_json(tmp_path / name / "summary.json",
                        {"status": status, "epochs_done": 1, "epochs": 3, "config": config,
                         "final_test_acc": 50.0 if status == "finished" else None})

    fake_run("fp32_resnet8_paper_e3_s0", "finished",
             device="cuda", data_dir="/elsewhere")       # free fields
    fake_run("posit4_resnet8_paper_e3_s0", "diverged")
    fake_run("fp32_resnet8_paper_e3_s1", "interrupted")
    jobs = sweep.plan(["fp32", "posit4"], range(2), flags, tmp_path)
    assert [(j.action, j.reason.split(";")[0]) for j in jobs] == [
        ("skip", "finished"), ("skip", "diverged after 1/3 epochs"),
        ("run", "resume (interrupted, 1/3 epochs)"), ("run", "new")]

    fake_run("posit4_resnet8_paper_e3_s1", "finished", lr=0.05)
    with pytest.raises(UserError, match=r"posit4_resnet8_paper_e3_s1 was made with other flags: "
                                        r"--lr 0.1 \(run: 0.05\)"):
        sweep.plan(["fp32", "posit4"], range(2), flags, tmp_path)
    # a tag keeps a variant apart
    assert (sweep.plan(["posit4"], [1], flags, tmp_path, tag="v2")[0].name
            == "posit4_resnet8_paper_e3_s1_v2")


def test_recorded_runs_are_done_and_records_hold_no_checkpoint(tmp_path):
    """A run recorded in the records folder is skipped whatever the runs folder holds (a new
    machine has no runs/); finishing a run copies its small files there, never last.pt."""
    flags = ["--epochs", "3", "--model", "resnet8"]
    records, runs_dir = tmp_path / "records", tmp_path / "runs"
    name = "fp32_resnet8_paper_e3_s0"
    args = cli.parse_args(cli.build_parser("t"), [*flags, "--seed", "0"])
    summary = {"status": "finished", "epochs_done": 3, "epochs": 3, "final_test_acc": 88.0,
               "config": cli.make_config(args, name=name).to_dict()}
    runs.write_json(records / name / "summary.json", summary)
    jobs = sweep.plan(["fp32"], range(2), flags, runs_dir, records_dir=records)
    assert [(j.name, j.action, j.reason) for j in jobs] == [
        (name, "skip", "recorded"), ("fp32_resnet8_paper_e3_s1", "run", "new")]
    # smoke runs are never recorded
    smoke = sweep.plan(["fp32"], [0], [*flags, "--synthetic"], runs_dir, records_dir=records)
    assert smoke[0].record_dir is None

    run_dir = runs_dir / "fp32_resnet8_paper_e3_s1"
    for f in ("config.json", "metrics.jsonl", "summary.json", "predictions.json", "last.pt",
              "stdout.log"):
        (run_dir / f).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / f).write_text(f"{f}\n")
    runs.copy_record(run_dir, records / run_dir.name)
    assert sorted(p.name for p in (records / run_dir.name).iterdir()) == \
        ["config.json", "metrics.jsonl", "predictions.json", "summary.json"]


@pytest.mark.parametrize("argv,needle", [
    (["--lr", "-1"], "--lr must be > 0"),
    (["--modle", "resnet8"], "unrecognized arguments: --modle"),
    (["--w-fmt", "e4m3"], "a format flag belongs in a configuration"),
    (["--seed", "3"], "--seed is set by the sweep"),
    (["--see", "3"], "set by the sweep"),                          # an abbreviation of --seed
    (["--name", "x"], "use the sweep's --tag"),
    (["--configs", "fp32,fp64"], "unknown configuration fp64"),
    (["--set", "big"], "--set 'big': unknown set"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--gpus", "0,x"], "--gpus '0,x'"),
    (["--gpus", "0", "--device", "cpu"], "--gpus with --device cpu"),
    (["--tag", "a/b"], "--tag 'a/b'"),
])
def test_bad_flags_exit_2_before_any_run(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "_launch", no_launch)
    entry = load_entry("sweep")
    with pytest.raises(SystemExit) as e:
        entry._entry([*argv, "--runs-dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_list_and_sets_are_data(capsys):
    entry = load_entry("sweep")
    assert entry.main(["--list"]) == 0
    out = capsys.readouterr().out
    for key, cfg in sweep.CONFIGS.items():
        assert key in out and cfg.script in out
        assert (ROOT / cfg.script).is_file()
    assert set(sweep.SETS["seed"]) == {"fp32", "bf16", "fp8-e5m2w", "fp8-e4m3w", "fp4", "posit4",
                                       "posit8", "posit16"}
    assert all(k in sweep.CONFIGS for keys in sweep.SETS.values() for k in keys)


def test_one_run_per_gpu_in_parallel_and_outcomes(tmp_path):
    """With --gpus 0,1 each run sees one GPU, no GPU runs two at once, both are used; a diverged
    run is recorded and the others go on; a failed run fails the sweep."""
    jobs = sweep.plan(["fp32", "bf16", "fp4", "posit8"], range(2), ["--epochs", "2"], tmp_path)
    lock = threading.Lock()
    busy, seen, peak = set(), [], [0]
    codes = {"fp4_resnet20_paper_e2_s0": 1, "posit8_resnet20_paper_e2_s1": 2}

    def fake_launch(job, gpu, stream, threads=None):
        assert not stream                                # parallel output goes to the logs only
        with lock:
            assert gpu not in busy
            busy.add(gpu)
            seen.append((job.name, gpu))
            peak[0] = max(peak[0], len(busy))
        time.sleep(0.05)
        rc = codes.get(job.name, 0)
        if rc == 0:
            runs.write_json(job.run_dir / "summary.json",
                            {"status": "finished", "final_test_acc": 42.0})
        with lock:
            busy.discard(gpu)
        return rc

    orig = sweep._launch
    sweep._launch = fake_launch
    try:
        res = sweep.execute(jobs, gpus=["0", "1"], out=lambda msg: None)
    finally:
        sweep._launch = orig
    assert sorted(n for n, _ in seen) == sorted(j.name for j in jobs)      # each run exactly once
    assert {g for _, g in seen} == {"0", "1"} and peak[0] == 2
    result = {j.name: j.result for j in jobs}
    assert result["fp4_resnet20_paper_e2_s0"] == "diverged"
    assert result["posit8_resnet20_paper_e2_s1"] == "failed"
    assert res.counts == {"finished": 6, "diverged": 1, "failed": 1}
    assert [j.name for j in res.failed] == ["posit8_resnet20_paper_e2_s1"]
    text = "\n".join(sweep.summary_lines(res))
    assert "6 finished, 1 diverged, 1 failed" in text and "42.00%" in text


def test_gpu_resolution():
    class A:
        device = "auto"
    assert sweep.resolve_gpus("none", A) is None
    assert sweep.resolve_gpus("2,3", A) == ["2", "3"]
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert sweep.resolve_gpus("auto", A) == ([str(i) for i in range(n)] if n > 1 else None)
    A.device = "cpu"
    assert sweep.resolve_gpus("auto", A) is None


def test_jobs_per_gpu_with_fake_device_counts(monkeypatch, tmp_path):
    """--jobs-per-gpu N: each GPU appears N times as a slot, so N runs share it at once; one
    GPU with N > 1 runs in parallel too; each run gets its share of the CPU threads; impossible
    combinations are one-line errors."""
    class A:
        device = "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert sweep.resolve_gpus("auto", A) is None                   # one GPU, one job: sequential
    assert sweep.resolve_gpus("auto", A, 3) == ["0", "0", "0"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert sweep.resolve_gpus("auto", A, 2) == ["0", "0", "1", "1"]
    assert sweep.resolve_gpus("1", A, 4) == ["1"] * 4
    for spec, n, device, needle in (("none", 2, "auto", "--gpus none"),
                                    ("auto", 0, "auto", "1 or more"),
                                    ("auto", 2, "cpu", "--device cpu")):
        A.device = device
        with pytest.raises(UserError, match=needle):
            sweep.resolve_gpus(spec, A, n)
    A.device = "auto"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserError, match="no CUDA device"):
        sweep.resolve_gpus("auto", A, 2)

    jobs = sweep.plan(["fp32", "bf16", "fp4"], range(2), ["--epochs", "2"], tmp_path)
    lock = threading.Lock()
    busy, peak, shares = [], [0], set()

    def fake_launch(job, gpu, stream, threads=None):
        with lock:
            busy.append(gpu)
            peak[0] = max(peak[0], busy.count("0"))
            shares.add(threads)
        time.sleep(0.1)
        runs.write_json(job.run_dir / "summary.json", {"status": "finished", "final_test_acc": 1.0})
        with lock:
            busy.remove(gpu)
        return 0

    monkeypatch.setattr(sweep, "_launch", fake_launch)
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 16)
    res = sweep.execute(jobs, gpus=["0", "0", "0"], out=lambda msg: None)
    assert res.counts == {"finished": 6} and peak[0] == 3 and shares == {16 // 3}


@pytest.mark.parametrize("key,fmt", [("fp4", "e2m1"), ("fp4-mx", "mxfp4"), ("fp4-nv", "nvfp4")])
def test_fp4_configurations_resolve_to_their_formats(key, fmt, tmp_path):
    """The sweep's three FP4 keys: the command each job runs, parsed by the FP4 script itself,
    trains its format for weights, activations and gradients, gradients stochastic, every layer
    quantized (as the seed's fp4), block formats unscaled on top of their block scales."""
    job = sweep.plan([key], [0], ["--epochs", "2"], tmp_path)[0]
    assert job.cmd[1] == str(ROOT / "FP4" / "train_cifar10_fp4.py")
    assert key in sweep.SETS["fp4-all"]
    spec = importlib.util.spec_from_file_location("fp4_script",
                                                  ROOT / "FP4" / "train_cifar10_fp4.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = script.plan(job.cmd[2:])["config"]
    assert config.name == f"{key}_resnet20_paper_e2_s0"
    f = config.format
    assert [f[r]["fmt"] for r in ("weight", "act", "grad")] == [fmt] * 3
    assert f["grad"]["rounding"] == "stochastic" and f["first_last_fp32"] is False
    block = fmt != "e2m1"
    assert ({f[r]["scaling"] for r in ("weight", "act", "grad")} == {"none"}) == block
    assert f["bits_per_element"] == {"e2m1": 4, "mxfp4": 4.25, "nvfp4": 4.5}[fmt]


def test_fp4_nv_fl_is_fp4_nv_with_first_and_last_fp32(tmp_path):
    """The extra 4-bit candidate differs from fp4-nv only in keeping the first conv and the last
    Linear in float32."""
    spec = importlib.util.spec_from_file_location("fp4_script",
                                                  ROOT / "FP4" / "train_cifar10_fp4.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fmts = {key: script.plan(sweep.plan([key], [0], [], tmp_path)[0].cmd[2:])["config"].format
            for key in ("fp4-nv", "fp4-nv-fl")}
    assert fmts["fp4-nv-fl"]["first_last_fp32"] is True
    assert {**fmts["fp4-nv-fl"], "first_last_fp32": False} == fmts["fp4-nv"]
    assert "fp4-nv-fl" not in sweep.SETS["seed"] and "fp4-nv-fl" in sweep.SETS["all"]


def _record_run(folder: Path, name: str, flags, status: str, labels=None, acc=88.0) -> None:
    """A run's summary (and predictions, when ``labels``) as the loop writes them."""
    args = cli.parse_args(cli.build_parser("t"), [*flags, "--seed", name.split("_s")[-1][0]])
    summary = {"status": status, "epochs_done": 3, "epochs": 3,
               "final_test_acc": acc if status == "finished" else None,
               "config": cli.make_config(args, name=name).to_dict()}
    if labels is not None:
        summary["test_images"] = len(labels)
        runs.write_predictions(folder / name, list(labels), labels)
    runs.write_json(folder / name / "summary.json", summary)


def _fake_cifar(root: Path, test_labels) -> Path:
    """A cifar-10-batches-py folder whose test batch holds ``test_labels`` (black images)."""
    import pickle

    import numpy as np
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batch = {"data": np.zeros((len(test_labels), 3072), np.uint8), "labels": list(test_labels)}
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    return root


def test_a_run_scored_on_other_test_images_is_refused(tmp_path):
    """Records of the 1,000-image subset do not count as done for a sweep on other test images
    (a user with the full 10,000): refused in one line, with the way out; the same images skip."""
    flags = ["--epochs", "3", "--model", "resnet8"]
    records, runs_dir = tmp_path / "records", tmp_path / "runs"
    subset, full = [i % 10 for i in range(30)], [i % 10 for i in range(50)]
    _record_run(records, "fp32_resnet8_paper_e3_s0", flags, "finished", labels=subset)
    same = _fake_cifar(tmp_path / "same", subset)
    jobs = sweep.plan(["fp32"], [0], [*flags, "--data-dir", str(same)], runs_dir,
                      records_dir=records)
    assert (jobs[0].action, jobs[0].reason) == ("skip", "recorded")
    other = _fake_cifar(tmp_path / "full", full)
    with pytest.raises(UserError, match=r"fp32_resnet8_paper_e3_s0 was scored on other test images "
                                        r"\(30\) than this sweep's data holds \(50\).*--tag"):
        sweep.plan(["fp32"], [0], [*flags, "--data-dir", str(other)], runs_dir, records_dir=records)
    # the same number of images, other labels (another subset): refused too
    shuffled = _fake_cifar(tmp_path / "shuffled", subset[::-1])
    with pytest.raises(UserError, match="other test images"):
        sweep.plan(["fp32"], [0], [*flags, "--data-dir", str(shuffled)], runs_dir,
                   records_dir=records)
    assert sweep.test_set(cli.parse_args(cli.build_parser("t"), ["--synthetic"])) is None
    assert sweep.test_set(cli.parse_args(cli.build_parser("t"), ["--data-dir",
                                                                 str(tmp_path / "none")])) is None


def test_diverged_and_unrecorded_runs_are_recorded(tmp_path, monkeypatch):
    """A divergence is a result: its record is written and a later sweep (another machine, no
    runs/) skips it; a finished run without a record (made under --records-dir none) is recorded
    when the sweep skips it; a record that cannot be written is said, not a traceback."""
    flags = ["--epochs", "3", "--model", "resnet8"]
    records, runs_dir = tmp_path / "records", tmp_path / "runs"
    _record_run(runs_dir, "fp32_resnet8_paper_e3_s0", flags, "finished")
    jobs = sweep.plan(["fp32", "posit4"], [0], flags, runs_dir, records_dir=records)
    assert [(j.action, j.reason, j.record_now) for j in jobs] == [
        ("skip", "finished", True), ("run", "new", False)]

    def diverge(job, gpu, stream, threads=None):
        _record_run(runs_dir, job.name, flags, "diverged")
        return sweep.EXIT_DIVERGED

    monkeypatch.setattr(sweep, "_launch", diverge)
    res = sweep.execute(jobs, out=lambda msg: None)
    assert res.counts == {"skipped": 1, "diverged": 1}
    assert "recorded in" in jobs[0].reason
    for name in ("fp32_resnet8_paper_e3_s0", "posit4_resnet8_paper_e3_s0"):
        assert (records / name / "summary.json").is_file()
    monkeypatch.setattr(sweep, "_launch", no_launch)
    again = sweep.plan(["fp32", "posit4"], [0], flags, tmp_path / "new-machine",
                       records_dir=records)
    assert [(j.action, j.reason.split(";")[0]) for j in again] == [
        ("skip", "recorded"), ("skip", "diverged after 3/3 epochs")]

    def refuse(run_dir, record_dir):
        raise OSError(28, "No space left on device", str(record_dir))

    late = sweep.plan(["fp32"], [1], flags, runs_dir, records_dir=tmp_path / "other-records")
    _record_run(runs_dir, "fp32_resnet8_paper_e3_s1", flags, "finished")
    monkeypatch.setattr(sweep, "_launch", lambda job, *a, **k: 0)
    monkeypatch.setattr(sweep.runs, "copy_record", refuse)
    res = sweep.execute(late, out=lambda msg: None)
    assert res.counts == {"finished": 1} and "record not written" in late[0].message
    assert "No space left on device" in "\n".join(sweep.summary_lines(res))


def test_a_corrupt_summary_resumes_instead_of_a_false_conflict(tmp_path, monkeypatch):
    """An unreadable summary.json has no config: the run's config.json is compared instead, and
    without either the run is resumed (its last.pt decides), not refused as 'other flags'."""
    flags = ["--epochs", "3", "--model", "resnet8"]
    run_dir = tmp_path / "fp32_resnet8_paper_e3_s0"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"status": "runn')
    jobs = sweep.plan(["fp32"], [0], flags, tmp_path)
    assert jobs[0].action == "run" and jobs[0].reason.startswith("resume (unreadable")
    args = cli.parse_args(cli.build_parser("t"), [*flags, "--seed", "0", "--lr", "0.05"])
    runs.write_json(run_dir / "config.json", {"config": cli.make_config(args, name="x").to_dict()})
    with pytest.raises(UserError, match=r"--lr 0.1 \(run: 0.05\)"):
        sweep.plan(["fp32"], [0], flags, tmp_path)


def test_a_runs_dir_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    entry = load_entry("sweep")
    with pytest.raises(SystemExit) as e:
        entry._entry(["--configs", "fp32", "--seeds", "1", *SMOKE, "--runs-dir",
                      str(tmp_path / "file" / "runs")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "file/runs" in err[0], err


def test_a_run_folder_that_cannot_be_written_fails_that_run_only_in_parallel(tmp_path, monkeypatch):
    """With runs in parallel, a run whose folder cannot be made is 'failed' with the reason; the
    other runs go on (no thread dies with a traceback)."""
    jobs = sweep.plan(["fp32", "bf16"], range(2), ["--epochs", "2"], tmp_path)

    def launch(job, gpu, stream, threads=None):
        if job.name.startswith("bf16") and job.seed == 0:
            raise OSError(13, "Permission denied", str(job.run_dir))
        runs.write_json(job.run_dir / "summary.json", {"status": "finished", "final_test_acc": 1.0})
        return 0

    monkeypatch.setattr(sweep, "_launch", launch)
    res = sweep.execute(jobs, gpus=["0", "1"], out=lambda msg: None)
    assert res.counts == {"finished": 3, "failed": 1}
    assert "Permission denied" in res.failed[0].message and res.failed[0].name.startswith("bf16")


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_to_the_sweep_alone_reaches_its_run(tmp_path, signame):
    """SIGTERM (or SIGHUP) sent to the sweep's process only, not its group: the running run gets
    it too, saves and stops as interrupted (not orphaned, not failed), no further run starts, and
    the sweep prints its summary and exits 128 + the signal."""
    import signal

    argv = ["--configs", "fp32,bf16", "--seeds", "1", "--runs-dir", str(tmp_path), "--synthetic",
            "--epochs", "200", "--model", "resnet8", "--batch-size", "32"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), *argv], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)   # its own group: only it gets the signal
    first = tmp_path / sweep.run_name("fp32", "resnet8", 200, 0, True)
    deadline = time.time() + 300
    while time.time() < deadline and not runs.read_jsonl(first / runs.METRICS):
        time.sleep(0.5)                   # an epoch done: the run is training for sure
    assert runs.read_jsonl(first / runs.METRICS), "the first run never finished an epoch"
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, signame), out[-2000:] + err[-2000:]
    assert "sweep summary: 2 runs: 1 interrupted, 1 not started" in out, out[-2000:]
    assert f"interrupted by {signame}" in err
    summary = json.loads((first / runs.SUMMARY).read_text())
    assert summary["status"] == "interrupted" and runs.load_checkpoint(first / runs.CHECKPOINT)
    assert not (tmp_path / sweep.run_name("bf16", "resnet8", 200, 0, True)).exists()
    assert not runs.is_locked(first)          # the run's process is gone, not orphaned


def test_the_bf16_row_is_autocast_on_every_machine(tmp_path):
    """The sweep's bf16 runs name their mode: the script's own choice (emulated on a CPU without
    bf16 arithmetic) would put bf16-emu's configuration under a bf16_* name."""
    bf16, emu = sweep.plan(["bf16", "bf16-emu"], [0], ["--epochs", "2"], tmp_path)
    assert bf16.cmd[bf16.cmd.index("--mode") + 1] == "autocast"
    assert emu.cmd[emu.cmd.index("--mode") + 1] == "emulated"
