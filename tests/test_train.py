"""The shared loop: learning, run files, exact resume, divergence, refusals, exit codes.

Runs use ResNet-8 on the synthetic set with few steps, so the whole file takes seconds.
"""
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import cli, runs, train
from common.errors import Diverged, UserError

ROOT = Path(__file__).resolve().parent.parent
FP32_SCRIPT = ROOT / "FP32" / "train_cifar10_fp32.py"
TIMING_KEYS = {"epoch_seconds", "train_seconds", "images_per_s", "wall_seconds"}


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def make_config(runs_dir, *flags, name="t"):
    parser = cli.build_parser("test")
    args = cli.parse_args(parser, ["--synthetic", "--model", "resnet8", "--batch-size", "64",
                                   "--device", "cpu", "--runs-dir", str(runs_dir), "--name", name,
                                   *flags])
    return cli.make_config(args, label="test", format={"name": "fp32"}, script="tests")


def load_fp32_script():
    spec = importlib.util.spec_from_file_location("fp32_script", FP32_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def exit_code(fn, argv):
    with pytest.raises(SystemExit) as e:
        cli.run_main(fn, argv)
    return e.value.code


# ---------------------------------------------------------------------------------------------
def test_lr_schedules():
    c = make_config("/tmp", "--epochs", "164")
    steps = 390
    assert train.lr_at(c, 81, steps - 1, steps) == pytest.approx(0.1)
    assert train.lr_at(c, 82, 0, steps) == pytest.approx(0.01)    # 82*390 = 31,980 ~ 32k iterations
    assert train.lr_at(c, 122, 0, steps) == pytest.approx(0.01)
    assert train.lr_at(c, 123, 0, steps) == pytest.approx(0.001)  # 123*390 = 47,970 ~ 48k
    assert train.lr_at(make_config("/tmp", "--epochs", "1"), 0, 5, 10) == pytest.approx(0.1)
    cos = make_config("/tmp", "--epochs", "10", "--schedule", "cosine")
    assert train.lr_at(cos, 0, 0, 10) == pytest.approx(0.1)
    assert train.lr_at(cos, 5, 0, 10) == pytest.approx(0.05)
    assert train.lr_at(cos, 9, 9, 10) == pytest.approx(0.1 * (1 + math.cos(math.pi * 9.9 / 10)) / 2)
    warm = make_config("/tmp", "--epochs", "10", "--warmup-epochs", "2")
    assert train.lr_at(warm, 0, 0, 10) == pytest.approx(0.1 / 20)
    assert train.lr_at(warm, 1, 9, 10) == pytest.approx(0.1)
    assert train.lr_at(warm, 2, 0, 10) == pytest.approx(0.1)


def test_linear_one_cycle_schedule():
    """--schedule linear with a warm-up: rises linearly over the warm-up, then falls linearly to
    0 at the end (values computed by hand for 10 epochs of 10 steps, 1 warm-up epoch)."""
    c = make_config("/tmp", "--epochs", "10", "--schedule", "linear", "--warmup-epochs", "1")
    assert train.lr_at(c, 0, 0, 10) == pytest.approx(0.1 * 1 / 10)      # first warm-up step
    assert train.lr_at(c, 0, 9, 10) == pytest.approx(0.1)                # warm-up done
    assert train.lr_at(c, 1, 0, 10) == pytest.approx(0.1)                # peak: t = 1 = warm-up
    assert train.lr_at(c, 5, 5, 10) == pytest.approx(0.1 * (10 - 5.5) / 9)
    assert train.lr_at(c, 9, 9, 10) == pytest.approx(0.1 * 0.1 / 9)      # last step, near 0
    no_warm = make_config("/tmp", "--epochs", "4", "--schedule", "linear")
    assert train.lr_at(no_warm, 2, 0, 10) == pytest.approx(0.05)


def test_recipe_presets_resolve_to_their_flags():
    """--recipe fast sets each of its preset flags; a flag given explicitly wins; paper is the
    plain defaults (He et al.'s 164-epoch step schedule)."""
    parser = cli.build_parser("test")
    fast = cli.make_config(cli.parse_args(parser, ["--recipe", "fast"]))
    assert fast.recipe == "fast"
    assert (fast.epochs, fast.schedule, fast.warmup_epochs, fast.nesterov, fast.weight_decay,
            fast.label_smoothing) == (20, "linear", 1.0, True, 5e-4, 0.1)
    for flag, value in cli.RECIPES["fast"].items():
        assert getattr(fast, flag) == value
    mixed = cli.make_config(cli.parse_args(cli.build_parser("t"), ["--recipe", "fast", "--epochs",
                                                                   "7", "--lr", "0.2"]))
    assert (mixed.epochs, mixed.lr, mixed.schedule) == (7, 0.2, "linear")
    paper = cli.make_config(cli.parse_args(cli.build_parser("t"), ["--recipe", "paper"]))
    assert (paper.epochs, paper.schedule, paper.label_smoothing, paper.nesterov) == \
        (164, "step", 0.0, False)
    help_text = cli.build_parser("t").format_help()
    assert "fast: --epochs 20" in help_text
    with pytest.raises(SystemExit):
        cli.parse_args(cli.build_parser("t"), ["--recipe", "quick"])


def test_parser_defaults_and_help():
    parser = cli.build_parser("test")
    help_text = parser.format_help()
    for flag in ("--model", "--epochs", "--batch-size", "--lr", "--momentum", "--weight-decay",
                 "--schedule", "--seed", "--device", "--data-dir", "--synthetic", "--channels-last",
                 "--compile", "--runs-dir", "--name", "--resume", "--max-steps-per-epoch",
                 "--eval-batch-size"):
        assert flag in help_text
    assert help_text.count("(default:") >= 20
    c = cli.make_config(cli.parse_args(parser, []))
    assert (c.model, c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, c.schedule) == \
        ("resnet20", 164, 128, 0.1, 0.9, 1e-4, "step")
    assert c.name == "resnet20_paper_e164_s0" and Path(c.runs_dir) == ROOT / "runs"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0
    assert cli.build_parser("t", defaults={"lr": 0.05}).parse_args([]).lr == 0.05
    smoke = cli.make_config(cli.parse_args(parser, ["--synthetic", "--max-steps-per-epoch", "3"]),
                            name=lambda a: f"x_{a.model}")
    assert smoke.name == "x_resnet20_synthetic_max3"


@pytest.mark.slow
def test_short_run_learns_and_writes_run_files(tmp_path, capsys):
    c = make_config(tmp_path, "--epochs", "3")
    summary = train.run(c)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("final test accuracy: ") and out[-1].endswith("(256 test images)")
    assert sum(line.startswith("epoch ") for line in out) == 3
    rows = runs.read_jsonl(c.run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] < math.log(10) + 0.5
    assert rows[-1]["train_loss"] < 0.9 * math.log(10)
    s = json.loads((c.run_dir / "summary.json").read_text())
    assert s == json.loads(json.dumps(summary))
    assert s["status"] == "finished" and s["epochs_done"] == 3
    assert s["final_test_acc"] == rows[-1]["test_acc"] and s["format"] == {"name": "fp32"}
    assert s["torch_version"] == torch.__version__ and s["device"] == "cpu" and s["params"] > 0
    assert torch.backends.cpu.get_cpu_capability() in s["device_name"]   # names CPU and ISA
    cfg = json.loads((c.run_dir / "config.json").read_text())
    assert cfg["config"]["lr"] == 0.1 and cfg["resolved"]["device"] == "cpu"
    assert "hash" in cfg["resolved"]["git"] and cfg["torch_version"] == torch.__version__
    ckpt = runs.load_checkpoint(c.run_dir / "last.pt")
    assert ckpt["epoch"] == 3 and not list(c.run_dir.glob(".*tmp"))


class StopAt:
    """after_step hook raising KeyboardInterrupt (a Ctrl-C) at the n-th optimizer step."""

    def __init__(self, n):
        self.n, self.count = n, 0

    def __call__(self, model):
        self.count += 1
        if self.count == self.n:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_resume_equals_uninterrupted_run_bit_for_bit(tmp_path):
    flags = ("--epochs", "2", "--max-steps-per-epoch", "4")
    straight = make_config(tmp_path, *flags, name="straight")
    train.run(straight)

    broken = make_config(tmp_path, *flags, name="broken")
    with pytest.raises(KeyboardInterrupt):
        train.run(broken, after_step=StopAt(6))                # Ctrl-C in the middle of epoch 2
    s = json.loads((broken.run_dir / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["epochs_done"] == 1
    assert runs.load_checkpoint(broken.run_dir / "last.pt")["epoch"] == 1

    train.run(make_config(tmp_path, *flags, "--resume", name="broken"))
    a = runs.load_checkpoint(straight.run_dir / "last.pt")
    b = runs.load_checkpoint(broken.run_dir / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert torch.equal(a["rng"]["data"], b["rng"]["data"])

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    assert strip(a["metrics"]) == strip(b["metrics"])
    assert strip(runs.read_jsonl(broken.run_dir / "metrics.jsonl")) == strip(a["metrics"])
    assert json.loads((broken.run_dir / "summary.json").read_text())["status"] == "finished"


def test_eval_every_scores_fewer_epochs_and_trains_the_same(tmp_path, capsys):
    """--eval-every 2 leaves epoch 1 unscored (test, EMA and validation), scores epochs 2 and 3
    (the last) as --eval-every 1 does, and trains the same weights; it may change on resume."""
    flags = ("--epochs", "3", "--max-steps-per-epoch", "3", "--ema-decay", "0.9", "--val-split")
    every = make_config(tmp_path, *flags, name="every")
    train.run(every)
    sparse = make_config(tmp_path, *flags, "--eval-every", "2", name="sparse")
    with pytest.raises(KeyboardInterrupt):
        train.run(sparse, after_step=StopAt(4))                # stopped in epoch 2
    s = json.loads((sparse.run_dir / "summary.json").read_text())
    assert s["epochs_done"] == 1 and s["last_test_acc"] is None and s["test_images"] is None
    train.run(make_config(tmp_path, *flags, "--eval-every", "2", "--resume", name="sparse"))
    a = runs.read_jsonl(every.run_dir / "metrics.jsonl")
    b = runs.read_jsonl(sparse.run_dir / "metrics.jsonl")
    scored = ("test_loss", "test_acc", "ema_test_acc", "val_loss", "val_acc")
    assert all(b[0].get(k) is None for k in scored) and b[0]["train_loss"] == a[0]["train_loss"]
    for ra, rb in zip(a[1:], b[1:]):
        assert all(ra[k] == rb[k] for k in scored + ("test_images", "train_loss")), ra["epoch"]
    wa = runs.load_checkpoint(every.run_dir / "last.pt")["model"]
    wb = runs.load_checkpoint(sparse.run_dir / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = json.loads((every.run_dir / "summary.json").read_text())
    sb = json.loads((sparse.run_dir / "summary.json").read_text())
    assert sb["status"] == "finished" and sb["final_test_acc"] == sa["final_test_acc"]
    assert sb["test_images"] == sa["test_images"] > 0
    assert "(test every 2 epochs)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        make_config(tmp_path, "--eval-every", "0")


@pytest.mark.slow
def test_cpu_time_adds_up_over_sessions_and_unknown_stays_unknown(tmp_path):
    """cpu_seconds (the run's process time) carries over a resume; a checkpoint written before
    it was counted (no cpu_seconds) leaves the total unknown rather than too small."""
    flags = ("--epochs", "2", "--max-steps-per-epoch", "4")
    for name, forget in (("counted", False), ("forgotten", True)):
        cfg = make_config(tmp_path, *flags, name=name)
        with pytest.raises(KeyboardInterrupt):
            train.run(cfg, after_step=StopAt(6))
        first = json.loads((cfg.run_dir / "summary.json").read_text())["cpu_seconds"]
        assert first > 0
        if forget:
            ckpt = runs.load_checkpoint(cfg.run_dir / "last.pt")
            del ckpt["cpu_seconds"]
            runs.save_checkpoint(cfg.run_dir / "last.pt", ckpt)
        total = train.run(make_config(tmp_path, *flags, "--resume", name=name))["cpu_seconds"]
        assert total is None if forget else total > first


def test_resume_finished_fresh_mismatch_and_overwrite(tmp_path, capsys):
    flags = ("--epochs", "1", "--max-steps-per-epoch", "2")
    first = train.run(make_config(tmp_path, *flags))
    capsys.readouterr()
    again = train.run(make_config(tmp_path, *flags, "--resume"))   # finished: nothing to do
    out = capsys.readouterr().out.strip().splitlines()
    assert "already finished" in out[0] and out[-1].startswith("final test accuracy:")
    assert not any(line.startswith("epoch ") for line in out)
    assert again["final_test_acc"] == first["final_test_acc"]

    with pytest.raises(UserError, match="--lr 0.05 \\(checkpoint: 0.1\\)"):
        train.run(make_config(tmp_path, *flags, "--resume", "--lr", "0.05"))
    with pytest.raises(UserError, match="already holds a run.*--resume.*--overwrite"):
        train.run(make_config(tmp_path, *flags))
    train.run(make_config(tmp_path, *flags, "--overwrite", "--seed", "1"))
    assert json.loads((tmp_path / "t" / "config.json").read_text())["config"]["seed"] == 1

    capsys.readouterr()
    train.run(make_config(tmp_path, *flags, "--resume", name="new"))
    assert "no checkpoint" in capsys.readouterr().out


def test_format_dict_with_tuples_and_objects_resumes(tmp_path):
    """A script's format dict is stored in JSON form, so odd values survive checkpoint and
    resume."""
    args = cli.parse_args(cli.build_parser("t"), ["--synthetic", "--model", "resnet8",
                                                  "--epochs", "1", "--max-steps-per-epoch", "1",
                                                  "--device", "cpu", "--runs-dir", str(tmp_path)])
    fmt = {"w": ("e4m3", "nearest"), "spec": Path("e5m2"), "bits_per_element": 8}
    first = train.run(cli.make_config(args, format=fmt, label="FP8 w=e4m3"))
    args.resume = True
    again = train.run(cli.make_config(args, format=fmt, label="FP8 w=e4m3"))
    assert again["final_test_acc"] == first["final_test_acc"]
    assert again["format"] == {"w": ["e4m3", "nearest"], "spec": "e5m2", "bits_per_element": 8}
    assert again["label"] == "FP8 w=e4m3"


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    c = make_config(tmp_path, "--epochs", "3", "--max-steps-per-epoch", "3")

    def poison(model, count=[0]):
        count[0] += 1
        if count[0] == 4:                                # first step of epoch 2
            with torch.no_grad():
                model.fc.weight.fill_(float("nan"))

    with pytest.raises(Diverged) as e:
        train.run(c, after_step=poison)
    assert "diverged" in str(e.value) and "epoch 1" in str(e.value)
    assert "diverged:" in capsys.readouterr().err
    s = json.loads((c.run_dir / "summary.json").read_text())
    assert s["status"] == "diverged" and s["epochs_done"] == 1 and s["final_test_acc"] is None
    ckpt = runs.load_checkpoint(c.run_dir / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_script_exit_codes_in_process(tmp_path, capsys, monkeypatch):
    fp32 = load_fp32_script()
    base = ["--synthetic", "--model", "resnet8", "--runs-dir", str(tmp_path), "--device", "cpu"]
    # bad data folder: a truncated pickle (no download is attempted: the folder exists)
    bad = tmp_path / "data" / "cifar-10-batches-py"
    bad.mkdir(parents=True)
    (bad / "data_batch_1").write_bytes(b"\x80\x02}q\x00(U\x04data")
    assert exit_code(fp32.main, ["--data-dir", str(tmp_path / "data"),
                                 "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot read CIFAR-10 batch")
    assert "Traceback" not in err[0]
    # flags: unknown model, contradictory flags
    assert exit_code(fp32.main, base + ["--model", "resnet21"]) == 2
    assert exit_code(fp32.main, base + ["--resume", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert exit_code(fp32.main, base[:-2] + ["--device", "cuda"]) == 2
        assert capsys.readouterr().err.startswith("error: --device cuda: no CUDA device")
    # divergence -> 1
    assert exit_code(fp32.main, base + ["--lr", "1e30", "--epochs", "1",
                                        "--max-steps-per-epoch", "3"]) == 1
    summary = json.loads((tmp_path / "fp32_resnet8_paper_e1_s0_synthetic_max3" / "summary.json")
                         .read_text())
    assert summary["status"] == "diverged"


@pytest.mark.slow
def test_fp32_script_runs_from_its_folder(tmp_path):
    """`cd FP32 && python train_cifar10_fp32.py ...` works and ends with the accuracy line."""
    proc = subprocess.run(
        [sys.executable, "train_cifar10_fp32.py", "--synthetic", "--model", "resnet8",
         "--epochs", "1", "--max-steps-per-epoch", "2", "--runs-dir", str(tmp_path)],
        cwd=FP32_SCRIPT.parent, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("final test accuracy: ")
    s = json.loads((tmp_path / "fp32_resnet8_paper_e1_s0_synthetic_max2" / "summary.json")
                   .read_text())
    assert s["status"] == "finished" and s["label"] == "FP32"
    assert s["format"]["bits_per_element"] == 32


@pytest.mark.slow
def test_synthetic_set_is_learned_and_a_dead_optimizer_stays_at_chance(tmp_path, monkeypatch):
    """The smoke-test data carries a class signal a working loop learns in 24 steps (ResNet-8,
    3 epochs of 8 steps; about 76% seen), while a loop whose optimizer does nothing stays at
    chance (10%): a smoke run's accuracy tells a learning loop from a broken one."""
    flags = ("--epochs", "3", "--max-steps-per-epoch", "8")
    learned = train.run(make_config(tmp_path, *flags, name="learns"))["final_test_acc"]
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, closure=None: None)
    dead = train.run(make_config(tmp_path, *flags, name="dead"))["final_test_acc"]
    assert learned > 50.0 and dead < 20.0, (learned, dead)


def test_warmup_longer_than_training_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(cli.build_parser("t"), ["--warmup-epochs", "5", "--epochs", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--warmup-epochs 5 is longer than --epochs 1" in err
    assert cli.parse_args(cli.build_parser("t"), ["--warmup-epochs", "1", "--epochs", "1"])
    assert cli.parse_args(cli.build_parser("t"),
                          ["--recipe", "fast", "--epochs", "1"]).warmup_epochs == 1


def test_compile_mode_uses_cuda_graphs_only_on_cuda():
    """--compile runs CUDA graphs (reduce-overhead) on CUDA unless --no-cuda-graphs; on a CPU
    graph mode is off whatever the flag says."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    plain = make_config("/tmp")
    compiled = make_config("/tmp", "--compile")
    no_graphs = make_config("/tmp", "--compile", "--no-cuda-graphs")
    assert train.compile_mode(plain, cuda) is None and train.compile_mode(plain, cpu) is None
    assert train.compile_mode(compiled, cuda) == "reduce-overhead"
    assert train.compile_mode(compiled, cpu) == "default"
    assert train.compile_mode(no_graphs, cuda) == "default"
    assert "cuda_graphs" in cli.RESUME_FREE_FIELDS        # how it runs, not what it trains


def test_a_data_error_leaves_no_run_folder(tmp_path, monkeypatch):
    """Missing data stops the run before it writes anything: no folder holding only .lock."""
    from common import data as data_mod
    from common.errors import DataError

    def offline(root):
        raise OSError("Name or service not known")

    monkeypatch.setattr(data_mod, "_download", offline)
    parser = cli.build_parser("test")
    args = cli.parse_args(parser, ["--model", "resnet8", "--device", "cpu", "--data-dir",
                                   str(tmp_path / "no-data"), "--runs-dir", str(tmp_path / "runs"),
                                   "--name", "r"])
    with pytest.raises(DataError):
        train.run(cli.make_config(args, label="test", format={"name": "fp32"}, script="tests"))
    assert not (tmp_path / "runs" / "r").exists()
    (tmp_path / "runs" / "kept").mkdir(parents=True)             # a folder it did not make stays
    (tmp_path / "runs" / "kept" / "stdout.log").write_text("sweep log\n")
    args.name = "kept"
    with pytest.raises(DataError):
        train.run(cli.make_config(args, label="test", format={"name": "fp32"}, script="tests"))
    assert sorted(p.name for p in (tmp_path / "runs" / "kept").iterdir()) == [".lock", "stdout.log"]
