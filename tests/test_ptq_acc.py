"""Post-training evaluation with emulated low-precision accumulation (ptq_eval.py --acc,
common/ptq_acc.py) and its report (common/report/accumulation.py): the flags, one JSON row per
(accumulator, k) plus float32, an fp32 accumulator repeats the float32 row, a narrow one moves
the logits far more than fp16 does, one-line errors, the table's numbers and the plot."""
import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from common import cli, ptq, ptq_acc, train
from common import data as data_mod
from common.accumulate import Accumulator
from common.qat import QuantConv2d, QuantLinear, quantize_model

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# ResNet-8 on the synthetic set, 3 epochs of 8 steps: well above chance (about 76%), so that
# predictions are not all one class (common/data.py's synthetic_cifar).
TRAIN = ["--synthetic", "--model", "resnet8", "--batch-size", "64", "--epochs", "3",
         "--max-steps-per-epoch", "8", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread", "eager_casts")   # one_thread: conftest.py


@pytest.fixture(scope="module")
def eager_casts():
    """The accumulator's rounding steps as eager ops: the same bits as the compiled kernels
    (tests/test_accumulate.py), without compiling them (tens of seconds on a small CPU)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANT_PATH", "eager")
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small FP32 run made by the training loop; returns its run folder."""
    tmp = tmp_path_factory.mktemp("ptq_acc")
    args = cli.parse_args(cli.build_parser("t"), [*TRAIN, "--runs-dir", str(tmp), "--name",
                                                  "tiny"])
    train.run(cli.make_config(args, label="FP32", format={"name": "fp32", "bits_per_element": 32},
                              script="tests"))
    return tmp / "tiny"


@pytest.fixture(scope="module")
def entry():
    spec = importlib.util.spec_from_file_location("ptq_entry_acc", ROOT / "ptq_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_specs_parse():
    assert ptq_acc.parse_accumulators("fp16,bf16,e5m7,e8m13:p4") == [
        ("fp16", None), ("bf16", None), ("e5m7", None), ("e8m13", 4)]
    assert ptq_acc.parse_accumulators(" fp16 , fp16,e5m10:p2") == [("fp16", None), ("fp16", 2)]
    assert ptq_acc.parse_chunks("1,16,32,128") == [1, 16, 32, 128]
    assert ptq_acc.parse_chunks(ptq_acc.DEFAULT_CHUNKS) == [1, 16, 32, 128]
    assert ptq_acc.acc_spec("e8m13", 4) == "e8m13:p4"
    from common.formats import parse_format
    assert [ptq_acc.mantissa_bits(parse_format(f)) for f in
            ("fp16", "bf16", "e5m7", "e8m13", "fp32", "posit16es1")] == [10, 7, 7, 13, 23, 12]
    assert ptq_acc.acc_file_name() == "ptq_acc.json"
    assert ptq_acc.acc_file_name(True, 128) == "ptq_acc_first-last-fp32_n128.json"
    assert ptq.ptq_file_name(limit_images=64) == "ptq_n64.json"


def test_bad_specs_exit_2_with_one_line(entry, trained, capsys):
    run = str(trained)
    for argv, needle in (
            [[run, "--acc", "fp99"], "--acc 'fp99'"],
            [[run, "--acc", "mxfp8"], "--acc 'mxfp8'"],
            [[run, "--acc", "e8m13:p0"], "--acc 'e8m13:p0'"],
            [[run, "--acc", "e8m13:x4"], "--acc 'e8m13:x4'"],
            [[run, "--acc", ""], "at least one accumulator"],
            [[run, "--acc", "fp16", "--acc-chunks", "0"], "--acc-chunks '0'"],
            [[run, "--acc", "fp16", "--acc-chunks", "16,x"], "--acc-chunks 'x'"],
            [[run, "--acc", "fp16", "--formats", "e4m3"], "--acc evaluates float32 operands"],
            [[run, "--acc-chunks", "16"], "--acc-chunks applies with --acc only"],
            [[run, "--acc", "fp16", "--limit-images", "0"], "--limit-images 0"]):
        with pytest.raises(SystemExit) as e:
            cli.run_main(entry.main, argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
        if argv[2] in ("fp99", "mxfp8", "e8m13:p0", "e8m13:x4"):
            assert "accepted: " in err[0] and "pN" in err[0]
        if "--acc-chunks" in argv:
            assert "integers >= 1" in err[0] or "with --acc only" in err[0]


@pytest.mark.slow
def test_cli_writes_one_row_per_accumulator_and_chunk(entry, trained, capsys):
    """--acc fp32,e5m2:p2 --acc-chunks 16,32 on 32 images: the float32 row, then 2 x 2 rows in
    ptq_acc_n32.json next to the weights; an fp32 accumulator scores as the float32 row."""
    with pytest.raises(SystemExit) as e:
        cli.run_main(entry.main, [str(trained), "--acc", "fp32,e5m2:p2", "--acc-chunks",
                                  "16,32", "--limit-images", "32", "--eval-batch-size", "16",
                                  "--device", "cpu"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    path = trained / "ptq_acc_n32.json"
    assert f"wrote {path}" in out
    for i in range(1, 6):                                 # a progress line per row
        assert f"[{i}/5]" in out
    assert "fp32 (reference)" in out and "e5m2:p2 k=32" in out
    res = json.loads(path.read_text())
    assert res["kind"] == "accumulation" and res["limit_images"] == 32
    assert res["test_images"] == 32 and res["device_name"] and res["eval_batch_size"] == 16
    assert res["accumulators"] == ["fp32", "e5m2:p2"] and res["chunks"] == [16, 32]
    rows = res["results"]
    assert [(r["accumulator"], r["chunk"], r["promote_every"]) for r in rows] == [
        ("fp32", None, None), ("fp32", 16, None), ("fp32", 32, None), ("e5m2:p2", 16, 2),
        ("e5m2:p2", 32, 2)]
    assert [r["mantissa_bits"] for r in rows] == [23, 23, 23, 2, 2]
    assert [r["reference"] for r in rows] == [True, False, False, False, False]
    assert rows[3]["name"] == "e5m2-k16-p2"
    for r in rows:
        assert r["test_images"] == 32 and r["seconds"] >= 0 and 0 <= r["test_acc"] <= 100
    ref = rows[0]
    for r in rows[1:3]:                                  # fp32 accumulation: the same scores
        assert r["test_acc"] == ref["test_acc"]
        assert r["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-5)
    assert rows[3]["test_loss"] != ref["test_loss"]      # e5m2 accumulation acted


def _acc_cli(entry, argv):
    with pytest.raises(SystemExit) as e:
        cli.run_main(entry.main, argv)
    return e.value.code


def test_rerun_adds_only_missing_rows_and_refuses_other_settings(entry, trained, tmp_path,
                                                                  capsys):
    """A rerun into the same file evaluates only the (accumulator, k) pairs it lacks and writes
    the union in order; a file of other settings gives one line naming it, exit 2."""
    out = tmp_path / "acc.json"
    base = [str(trained), "--limit-images", "32", "--eval-batch-size", "16", "--device", "cpu",
            "--out", str(out)]
    assert _acc_cli(entry, [*base, "--acc", "e5m2:p2", "--acc-chunks", "32"]) == 0
    first = json.loads(out.read_text())["results"]
    capsys.readouterr()
    assert _acc_cli(entry, [*base, "--acc", "fp32,e5m2:p2", "--acc-chunks", "16,32"]) == 0
    printed = capsys.readouterr().out
    assert "[4/4]" in printed and "[5/" not in printed      # float32 + 3 new rows, not 5
    res = json.loads(out.read_text())
    rows = res["results"]
    assert [(r["accumulator"], r["chunk"]) for r in rows] == [
        ("fp32", None), ("fp32", 16), ("fp32", 32), ("e5m2:p2", 16), ("e5m2:p2", 32)]
    assert rows[4] == first[1]                               # kept as written, not evaluated
    assert res["accumulators"] == ["fp32", "e5m2:p2"] and res["chunks"] == [16, 32]
    for argv, needle in (([*base[:4], "8", *base[5:]], "eval_batch_size"),
                         ([*base, "--first-last-fp32"], "first_last_fp32")):
        assert _acc_cli(entry, [*argv, "--acc", "fp16", "--acc-chunks", "16"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(out) in err[0] and needle in err[0], err
    assert json.loads(out.read_text()) == res                # the refused file is untouched


def test_rerun_into_a_file_that_is_no_accumulation_evaluation_exits_2(entry, trained,
                                                                       tmp_path, capsys):
    out = tmp_path / "acc.json"
    out.write_text("{not json")
    argv = [str(trained), "--limit-images", "16", "--device", "cpu", "--out", str(out),
            "--acc", "fp16", "--acc-chunks", "16"]
    assert _acc_cli(entry, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "not an accumulation evaluation" in err[0]
    assert out.read_text() == "{not json"


def test_rows_are_written_as_they_finish(trained, tmp_path):
    """An evaluation stopped after its second row leaves a file with the rows it finished."""
    out = tmp_path / "acc.json"

    def stop_after_two(row, index, total):
        if index == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        ptq_acc.run_ptq_acc(trained / "weights.pt", [("fp16", None)], [16, 32], device="cpu",
                            limit_images=16, out=out, log=stop_after_two)
    rows = json.loads(out.read_text())["results"]
    assert [(r["accumulator"], r["chunk"]) for r in rows] == [("fp32", None), ("fp16", 16)]


@pytest.fixture(scope="module")
def batch(trained):
    """The loaded float model and its first 4 test images, normalised (k = 1 emulates one step
    per product: few images keep it quick)."""
    setup = ptq.prepare(trained / "weights.pt", device="cpu", limit_images=4)
    x, _ = next(data_mod.eval_batches(setup.data, 4, setup.normalizer))
    return setup.model, x


def _logits(model, x, fmt, k, promote=None, first_last_fp32=False):
    q = quantize_model(copy.deepcopy(model),
                       ptq_acc.acc_qconfig(Accumulator(fmt, k, promote), first_last_fp32))
    with torch.no_grad():
        return q(x), q


@pytest.mark.slow
def test_narrow_accumulator_moves_the_logits_far_more_than_fp16(batch):
    model, x = batch
    with torch.no_grad():
        ref = model(x)
    scale = ref.abs().max().item()
    fp32, _ = _logits(model, x, "fp32", 16)
    fp16, _ = _logits(model, x, "fp16", 32)
    e5m2, _ = _logits(model, x, "e5m2", 1)
    d32, d16, d2 = ((t - ref).abs().max().item() for t in (fp32, fp16, e5m2))
    print(f"max |logit - float32|: fp32 k16 {d32:.3g}, fp16 k32 {d16:.3g}, e5m2 k1 {d2:.3g}; "
          f"largest |logit| {scale:.3g}")
    assert d32 <= 1e-5 * scale and torch.equal(fp32.argmax(1), ref.argmax(1))
    assert 0 < d16 <= 2e-2 * scale                       # fp16 rounds, a little
    assert d2 > 100 * d16 and d2 > 0.05 * scale          # 3 significant bits, one product a step


@pytest.mark.slow
def test_first_last_fp32_keeps_those_layers_plain(batch):
    model, x = batch
    every, q_every = _logits(model, x, "e5m2", 32)
    inner, q_inner = _logits(model, x, "e5m2", 32, first_last_fp32=True)
    convs = [m for m in q_inner.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in q_inner.modules() if isinstance(m, nn.Linear)]
    assert type(convs[0]) is nn.Conv2d and type(linears[-1]) is nn.Linear
    assert all(isinstance(m, QuantConv2d) for m in convs[1:])
    assert all(isinstance(m, (QuantConv2d, QuantLinear))
               for m in q_every.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert not torch.equal(every, inner)


# ----------------------------------------------------------------------------------------------
# The report, from a fabricated ptq_acc.json (numbers made up here, not from a run)
# ----------------------------------------------------------------------------------------------
REF_ACC = 91.3
ACCS = {("fp16", None, 10): {1: 90.9, 16: 91.3, 32: 91.25, 128: 91.2},
        ("bf16", None, 7): {1: 40.2, 16: 88.0, 32: 89.1, 128: 90.5},
        ("e5m7", None, 7): {1: 38.0, 16: 87.5, 32: 89.0, 128: 90.4},
        ("e8m13", 4, 13): {1: 91.3, 16: 91.3, 32: 91.3, 128: 91.4}}


def fabricate(run_dir: Path, first_last: bool = False) -> Path:
    config = json.loads((run_dir / "config.json").read_text())["config"]
    rows = [{"accumulator": "fp32", "format": "fp32", "name": "float32 (no emulation)",
             "reference": True, "chunk": None, "promote_every": None, "mantissa_bits": 23,
             "test_acc": REF_ACC, "test_loss": 0.3, "test_images": 256, "seconds": 1.0}]
    for (fmt, p, bits), by_k in ACCS.items():
        rows += [{"accumulator": ptq_acc.acc_spec(fmt, p), "format": fmt, "reference": False,
                  "chunk": k, "promote_every": p, "mantissa_bits": bits, "test_acc": a,
                  "test_loss": 0.4, "test_images": 256, "seconds": 2.0} for k, a in by_k.items()]
    d = {"kind": "accumulation", "source": {"name": run_dir.name, "label": config["label"],
                                            "format": config["format"], "epoch": 3, "epochs": 3,
                                            "config": config},
         "device_name": "CPU X", "test_images": 256, "eval_batch_size": 256, "limit_images": None,
         "first_last_fp32": first_last, "results": rows}
    path = run_dir / ptq_acc.acc_file_name(first_last)
    path.write_text(json.dumps(d))
    return path


def test_report_table_and_plot_from_a_fabricated_file(trained, tmp_path):
    from common import report
    from common.report import accumulation

    runs_dir = tmp_path / "runs"
    run = runs_dir / "tiny"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("ptq*.json", "*.pt"))
    fabricate(run)
    res = report.make_report(runs_dir, tmp_path / "out")
    assert res["ptq_acc"] == 1 and res["ptq"] == 0        # not read as a format PTQ file
    png = tmp_path / "out" / accumulation.ACC_PLOT
    assert png in res["plots"] and png.read_bytes()[:8] == PNG_MAGIC
    text = (tmp_path / "out" / "results.md").read_text()
    assert "## Low-precision accumulation after training" in text
    assert f"]({accumulation.ACC_PLOT})" in text
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| accumulator |"))
    header = [c.strip() for c in lines[head].strip("|").split("|")]
    assert header == ["accumulator", "mantissa bits", "k = 1", "k = 16", "k = 32", "k = 128"]
    body = {}
    for ln in lines[head + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        body[cells[0]] = cells[1:]
    breaks = body.pop(next(name for name in body if name.startswith("breaks at")))
    # drops beyond 1 point: bf16 and e5m7 (7 bits) at k = 1, 16 and 32; none at k = 128, where
    # both stay 0.8-0.9 below; e8m13 is promoted and left out
    assert breaks == ["", "7 bits (>= 10 hold)", "7 bits (>= 10 hold)", "7 bits (>= 10 hold)",
                      "none (all >= 7 hold)"]
    assert list(body) == ["float32 GEMMs (reference)", "fp16", "bf16", "e5m7", "e8m13 (P = 4)"]
    assert body["float32 GEMMs (reference)"] == ["23"] + [f"{REF_ACC:.2f}"] * 4
    for (fmt, p, bits), by_k in ACCS.items():
        name = fmt if p is None else f"{fmt} (P = {p})"
        want = [str(bits)] + [f"{a:.2f} ({a - REF_ACC:+.2f})" for a in by_k.values()]
        assert body[name] == want, (name, body[name], want)


def test_break_points_by_hand():
    """The widest width more than BREAK_DROP below float32, and the narrowest above it that
    holds, per chunk size: a width breaks if any accumulator of that width does; a width
    below the break that holds again does not count as holding."""
    from common.report import accumulation

    def row(spec, bits, k, acc, promote=None):
        return {"accumulator": spec, "reference": False, "chunk": k, "promote_every": promote,
                "mantissa_bits": bits, "test_acc": acc}

    results = [{"reference": True, "test_acc": 90.0},
               row("e5m10", 10, 1, 89.5), row("e5m7", 7, 1, 85.0), row("e5m4", 4, 1, 89.9),
               row("e5m10", 10, 8, 90.0), row("e5m7", 7, 8, 89.2), row("e6m7", 7, 8, 88.9),
               row("e5m4", 4, 8, 80.0), row("e8m2", 2, 8, 10.0, promote=4),
               row("e5m10", 10, 64, 70.0), row("e5m7", 7, 64, 60.0)]
    g = accumulation.AccGroup("k", "label", {}, [{"results": results}])
    assert accumulation.BREAK_DROP == 1.0
    assert accumulation.break_points(g) == {1: (10, 7), 8: (10, 7), 64: (None, 10)}


def test_plot_lines_reference_and_promoted_point(trained, tmp_path):
    from common.report import accumulation

    run = tmp_path / "tiny"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("ptq*.json", "*.pt"))
    files = accumulation.load_acc([tmp_path])
    assert files == []
    fabricate(run)
    fabricate(run, first_last=True)                      # its own group, its own table
    groups = accumulation.group_acc(accumulation.load_acc([tmp_path]))
    assert len(groups) == 2
    info = accumulation.plot_accumulation(groups[:1], tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
    panel = info["panels"][0]
    assert sorted(panel["lines"]) == [1, 16, 32, 128] and panel["reference"] == REF_ACC
    assert panel["promoted"] == ["e8m13 (P = 4)"]
    for k, pts in panel["lines"].items():
        assert [p["spec"] for p in pts] == ["bf16", "e5m7", "fp16", "e8m13:p4"]
        assert [round(p["x"]) for p in pts] == [7, 7, 10, 13]       # x: mantissa bits
        assert [p["y"] for p in pts] == [ACCS["bf16", None, 7][k], ACCS["e5m7", None, 7][k],
                                         ACCS["fp16", None, 10][k], ACCS["e8m13", 4, 13][k]]
        assert [p["promoted"] for p in pts] == [False, False, False, True]
    xs = {k: [p["x"] for p in pts] for k, pts in panel["lines"].items()}
    assert len({x[2] for x in xs.values()}) == 4          # the k lines drawn apart
    ax0, ay0, ax1, ay1 = panel["axes_box"]
    lx0, ly0, lx1, ly1 = panel["legend_box"]
    assert ly1 <= ay0                                     # the legend is below the axes
    lines = accumulation.acc_lines(groups, None)
    assert sum(ln.startswith("### ") for ln in lines) == 2
    assert any("except the first and last" in ln for ln in lines)
