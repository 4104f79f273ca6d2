"""Final weights in run records and the evaluation entry: the weights' round trip, corrupt and
mismatched files, a record's accuracy reproduced from its weights alone (float32 and a quantized
run whose activations take their scale per test batch), records of older runs getting weights
from last.pt, and the --val-split hold-out (fixed, disjoint from training)."""
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common import cli, evaluation, qat_cli, runs, sweep, train
from common import data as data_mod
from common.errors import UserError
from common.qat import QuantConfig, RoleQuant
from common.resnet import build_model

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--synthetic", "--model", "resnet8", "--batch-size", "32", "--epochs", "2",
         "--max-steps-per-epoch", "4", "--device", "cpu", "--eval-batch-size", "100"]

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def fp32_run(runs_dir, *flags, name="f32"):
    args = cli.parse_args(cli.build_parser("t"), [*SMOKE, "--runs-dir", str(runs_dir), "--name",
                                                  name, *flags])
    return train.run(cli.make_config(args, label="FP32", format={"family": "fp32"},
                                     script="tests"))


def fp8_run(runs_dir, name="q8"):
    """A quantized run as the FP8 script plans it: e4m3 weights scaled per tensor, e4m3
    activations scaled per tensor (per test batch in evaluation), e5m2 gradients."""
    parser = cli.build_parser("t")
    qat_cli.add_quant_args(parser, {"w_fmt": "e4m3", "a_fmt": "e4m3", "g_fmt": "e5m2",
                                    "w_scaling": "tensor", "a_scaling": "tensor",
                                    "g_scaling": "tensor"}, "")
    args = cli.parse_args(parser, [*SMOKE, "--runs-dir", str(runs_dir), "--name", name])
    return train.run(**qat_cli.plan_quantized(args, "fp8", "FP8", "tests"))


def record_of(run_dir, record_dir):
    runs.copy_record(run_dir, record_dir)
    return record_dir


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A float32 and an FP8 run, each recorded in a folder of its own (no checkpoint there)."""
    tmp = tmp_path_factory.mktemp("evaluation")
    fp32_run(tmp / "runs")
    fp8_run(tmp / "runs")
    return {name: record_of(tmp / "runs" / name, tmp / "records" / name) for name in ("f32", "q8")}


# ---------------------------------------------------------------------------------------------
def test_weights_round_trip_and_sha(tmp_path):
    model = build_model("resnet8").to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.data.normal_()
    path = tmp_path / "weights.pt"
    sha = runs.save_weights(path, model.state_dict())
    assert sha == runs.file_sha256(path)
    raw = torch.load(path, weights_only=True)              # loadable without trusting the file
    assert set(raw) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(raw[k], v) and raw[k].dtype == v.dtype and raw[k].is_contiguous()
    assert all(v.dtype == torch.float32 for v in raw.values() if v.is_floating_point())
    loaded = runs.load_weights(path, sha)
    fresh = build_model("resnet8")
    fresh.load_state_dict(loaded)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                  model.state_dict().values()))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not a state_dict", "other sha"])
def test_corrupt_or_foreign_weights_are_one_line_naming_the_file(tmp_path, damage):
    path = tmp_path / "weights.pt"
    sha = runs.save_weights(path, build_model("resnet8").state_dict())
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
        sha = None
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
        sha = None
    elif damage == "not a state_dict":
        buffer = io.BytesIO()
        torch.save([torch.zeros(3)], buffer)
        path.write_bytes(buffer.getvalue())
        sha = None
    else:
        sha = "0" * 64
    with pytest.raises(UserError) as e:
        runs.load_weights(path, sha)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_finished_run_writes_its_weights_and_their_sha(made):
    record = made["f32"]
    summary = json.loads((record / "summary.json").read_text())
    assert summary["weights_file"] == "weights.pt"
    assert summary["weights_sha256"] == runs.file_sha256(record / "weights.pt")
    assert not (record / "last.pt").exists()                 # records never hold checkpoints


@pytest.mark.parametrize("name", ["f32", "q8"])
def test_evaluation_of_a_record_repeats_its_recorded_accuracy(made, name):
    record = made[name]
    last = runs.read_jsonl(record / "metrics.jsonl")[-1]
    res = evaluation.evaluate_record(evaluation.find_weights(str(record)), device="cpu",
                                     predictions=True)
    assert res["test_acc"] == last["test_acc"] and res["test_images"] == last["test_images"]
    assert res["test_loss"] == pytest.approx(last["test_loss"], rel=1e-6)
    assert res["same_test_images"] and res["matches_record"]
    assert res["correct"] == json.loads((record / "predictions.json").read_text())["correct"]


def test_evaluation_rebuilds_the_records_quantization(made):
    """The FP8 record's model is rebuilt with its casts: scored as plain float32 its loss moves."""
    trained = evaluation.load_trained(evaluation.find_weights(str(made["q8"])))
    q = QuantConfig.from_dict(trained.summary["format"])
    assert q.weight == RoleQuant("e4m3", scaling="tensor") and q.act.fmt.name == "e4m3"
    dev = torch.device("cpu")
    data = data_mod.load_device_data(dev, synthetic=True)
    norm = data_mod.Normalizer(dev, channels_last=True)
    quant = train.evaluate(evaluation.rebuild_model(trained, dev), data, norm, 100)
    plain = train.evaluate(evaluation.rebuild_model(trained, dev, quantized=False), data, norm, 100)
    last = trained.metrics[-1]
    assert quant["test_loss"] == pytest.approx(last["test_loss"], rel=1e-6)
    assert plain["test_loss"] != quant["test_loss"]


def test_a_change_the_check_must_see(made, tmp_path):
    """Other weights under the same record's sha: the evaluation no longer repeats the record."""
    record = Path(shutil.copytree(made["f32"], tmp_path / "changed"))
    state = runs.load_weights(record / "weights.pt")
    state["fc.bias"] = state["fc.bias"] + torch.arange(10.0)
    sha = runs.save_weights(record / "weights.pt", state)
    summary = json.loads((record / "summary.json").read_text())
    runs.write_json(record / "summary.json", {**summary, "weights_sha256": sha})
    res = evaluation.evaluate_record(record / "weights.pt", device="cpu")
    assert res["same_test_images"] and not res["matches_record"]


@pytest.mark.slow
def test_cli_prints_result_and_refuses_bad_weights_with_exit_2(made, tmp_path):
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--device", "cpu", "--check"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([*cmd, str(made["f32"]), "--out", str(tmp_path / "e.json")],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "repeats the record exactly" in ok.stdout
    assert json.loads((tmp_path / "e.json").read_text())["matches_record"] is True

    wrong = Path(shutil.copytree(made["f32"], tmp_path / "wrong-model"))
    sha = runs.save_weights(wrong / "weights.pt", build_model("resnet20").state_dict())
    summary = json.loads((wrong / "summary.json").read_text())
    runs.write_json(wrong / "summary.json", {**summary, "weights_sha256": sha})
    corrupt = Path(shutil.copytree(made["f32"], tmp_path / "corrupt"))
    (corrupt / "weights.pt").write_bytes(b"\0" * 100)
    for folder in (wrong, corrupt):
        bad = subprocess.run([*cmd, str(folder)], capture_output=True, text=True, env=env)
        assert bad.returncode == 2
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and str(folder / "weights.pt") in lines[0], bad.stderr


def test_record_of_an_older_run_gets_weights_from_last_pt(tmp_path):
    """A run finished before runs wrote weights.pt: its record takes them from last.pt's model,
    and the sweep re-records a weightless record while the run folder can supply them."""
    fp32_run(tmp_path / "runs", name="old")
    run_dir = tmp_path / "runs" / "old"
    (run_dir / "weights.pt").unlink()
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["weights_file"], summary["weights_sha256"]
    runs.write_json(run_dir / "summary.json", summary)
    record = tmp_path / "records" / "old"
    for name in ("config.json", "metrics.jsonl", "summary.json", "predictions.json"):
        record.mkdir(parents=True, exist_ok=True)
        shutil.copy(run_dir / name, record / name)             # a record as older code wrote it

    job = sweep.Job("fp32", 0, "old", [], run_dir, record_dir=record, action="skip",
                    record_now=True)
    sweep.execute([job], out=lambda _: None)
    ckpt = runs.load_checkpoint(run_dir / "last.pt")
    kept = runs.load_weights(record / "weights.pt",
                             json.loads((record / "summary.json").read_text())["weights_sha256"])
    assert all(torch.equal(kept[k], v) for k, v in ckpt["model"].items())
    res = evaluation.evaluate_record(record / "weights.pt", device="cpu")
    assert res["matches_record"]


def test_sweep_rerecords_a_weightless_record_only_when_weights_are_there(tmp_path):
    run_dir, record = tmp_path / "run", tmp_path / "record"
    run_dir.mkdir()
    record.mkdir()
    job = sweep.Job("fp32", 0, "x", [], run_dir, record_dir=record)
    assert sweep.needs_record(job, recorded=False)
    assert not sweep.needs_record(job, recorded=True)          # nothing to add
    (run_dir / "last.pt").write_bytes(b"")
    assert sweep.needs_record(job, recorded=True)              # last.pt can supply the weights
    (record / "weights.pt").write_bytes(b"")
    assert not sweep.needs_record(job, recorded=True)          # the record has them already
    assert not sweep.needs_record(sweep.Job("fp32", 0, "x", [], run_dir), recorded=False)


# ---------------------------------------------------------------------------------------------
def test_val_split_is_fixed_and_disjoint_from_training():
    full = data_mod.load_device_data("cpu", synthetic=True)
    split = data_mod.load_device_data("cpu", synthetic=True, val_split=True)
    again = data_mod.load_device_data("cpu", synthetic=True, val_split=True)
    n = full.train_x.shape[0]
    k = data_mod.validation_images(n)
    assert k == n // 10 and split.val_x.shape[0] == k and split.train_x.shape[0] == n - k
    assert torch.equal(split.val_x, full.train_x[n - k:])           # the last k, in order
    assert torch.equal(split.train_x, full.train_x[:n - k])
    assert torch.equal(split.val_x, again.val_x) and torch.equal(split.val_y, again.val_y)
    assert torch.equal(split.test_x, full.test_x)                   # the test set is untouched
    assert data_mod.validation_images(50000) == 5000
    with pytest.raises(ValueError):
        list(data_mod.eval_batches(full, 100, data_mod.Normalizer("cpu"), split="val"))


def test_val_split_on_cifar10_is_the_second_half_of_data_batch_5():
    path, _ = data_mod.resolve_data_dir(None)
    batches = data_mod.find_batches_dir(path)
    if batches is None:
        pytest.skip("CIFAR-10 not found (set CIFAR10_DIR)")
    split = data_mod.load_device_data("cpu", str(batches), val_split=True)
    x5, y5 = data_mod.read_batch(batches / "data_batch_5")
    assert split.train_x.shape[0] == 45000 and split.val_x.shape[0] == 5000
    assert np.array_equal(split.val_x.numpy(), x5[5000:])
    assert np.array_equal(split.val_y.numpy(), y5[5000:])
    assert np.array_equal(split.train_x[-5000:].numpy(), x5[:5000])
    # no image of the validation set is also a training image (by pixels)
    train_keys = {bytes(img) for img in split.train_x.reshape(45000, -1).numpy()}
    assert not any(bytes(img) in train_keys for img in split.val_x.reshape(5000, -1).numpy())


def test_val_split_run_reports_val_accuracy_and_is_named_apart(tmp_path):
    args = cli.parse_args(cli.build_parser("t"),
                          [*SMOKE, "--runs-dir", str(tmp_path), "--val-split"])
    config = cli.make_config(args, name="fp32_x", label="FP32", format={"family": "fp32"})
    assert "_val" in config.name and config.val_split
    summary = train.run(config)
    rows = runs.read_jsonl(config.run_dir / "metrics.jsonl")
    assert all(0 <= r["val_acc"] <= 100 and r["val_images"] == 51 for r in rows)
    assert summary["final_val_acc"] == rows[-1]["val_acc"] and summary["val_images"] == 51
    assert sweep.run_name("fp32", "resnet8", 2, 0, val_split=True).endswith("_val")
