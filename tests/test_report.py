"""report.py on a hand-written runs/ folder: the table's numbers (recomputed here from the fixture's
values), the FP32 differences, the runs that did not finish, the PTQ table, valid PNGs, filters
and one-line errors."""
import json
import math

import pytest

from common import cli, report
from common.cli import RunConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

FP32 = {"name": "fp32", "bits_per_element": 32}
FP8 = {"family": "fp8", "bits_per_element": 8,
       "weight": {"fmt": "e4m3", "rounding": "nearest", "scaling": "tensor"},
       "act": {"fmt": "e4m3", "rounding": "nearest", "scaling": "tensor"}}
P4 = {"family": "posit4es0", "bits_per_element": 4,
      "weight": {"fmt": "posit4es0", "rounding": "nearest", "scaling": "channel"}}

# name, label, format, seed, status, per-epoch test accuracies, wall seconds, device name
EPOCHS = 3
RUNS = [
    ("fp32_s0", "FP32", FP32, 0, "finished", [60.0, 80.0, 91.3], 300.0, "GPU A"),
    ("fp32_s1", "FP32", FP32, 1, "finished", [58.0, 79.0, 90.7], 330.0, "GPU A"),
    ("fp8_s0", "FP8 e4m3", FP8, 0, "finished", [55.0, 77.0, 89.9], 600.0, "GPU A"),
    ("fp8_s1", "FP8 e4m3", FP8, 1, "finished", [57.0, 78.0, 90.4], 640.0, "GPU A"),
    ("fp8_s2", "FP8 e4m3", FP8, 2, "interrupted", [56.0, 76.5], 400.0, "GPU A"),
    ("posit4_s0", "Posit4", P4, 0, "diverged", [12.0], 90.0, "GPU A"),
]


def write_run(runs_dir, name, label, fmt, seed, status, accs, wall, device_name, epochs=EPOCHS,
              lr=0.1):
    config = RunConfig(name=name, model="resnet20", epochs=epochs, seed=seed, lr=lr, label=label,
                       format=fmt, runs_dir=str(runs_dir), device="cuda").to_dict()
    d = runs_dir / name
    d.mkdir(parents=True)
    metrics = [{"epoch": i + 1, "test_acc": a, "test_loss": 1.0 / (i + 1), "test_images": 1000,
                "train_images": 49920, "epoch_seconds": wall / len(accs) - 10 + i}
               for i, a in enumerate(accs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    finished = status == "finished"
    summary = {
        "name": name, "status": status,
        "message": "diverged: loss NaN" if status == "diverged" else "",
        "label": label, "format": fmt, "model": "resnet20", "epochs": epochs,
        "epochs_done": len(accs), "final_test_acc": accs[-1] if finished else None,
        "last_test_acc": accs[-1], "test_images": 1000, "wall_seconds": wall,
        "mean_images_per_s": 49920 * len(accs) / wall, "device": "cuda:0",
        "device_name": device_name, "updated_at": "2025-01-01T00:00:00", "config": config,
    }
    (d / "summary.json").write_text(json.dumps(summary))
    return summary


def write_ptq(runs_dir, name, rows, config):
    d = {"source": {"name": name, "label": config["label"], "format": config["format"],
                    "epoch": config["epochs"], "epochs": config["epochs"], "config": config},
         "device_name": "GPU A", "test_images": 1000, "eval_batch_size": 1000,
         "weight_scaling": "channel", "first_last_fp32": False,
         "results": [{"format": f, "bits": b, "scaling": s, "test_acc": a, "test_loss": 1.0}
                     for f, b, s, a in rows]}
    (runs_dir / name / "ptq.json").write_text(json.dumps(d))


@pytest.fixture
def runs_dir(tmp_path):
    rd = tmp_path / "runs"
    rd.mkdir()
    summaries = {r[0]: write_run(rd, *r) for r in RUNS}
    # another experiment (other lr): its own table, and not compared with the FP32 above
    write_run(rd, "fp32_lr05", "FP32", FP32, 0, "finished", [50.0, 70.0, 85.0], 300.0, "GPU A",
              lr=0.05)
    # a run folder whose script died before writing its first summary
    (rd / "broken").mkdir()
    (rd / "broken" / "stdout.log").write_text("Traceback ...\n")
    write_ptq(rd, "fp32_s0", [("fp32", 32, "none", 91.3), ("e4m3", 8, "none", 91.0),
                              ("e4m3", 8, "scaled", 91.2), ("posit4es0", 4, "none", 10.0),
                              ("posit4es0", 4, "scaled", 40.5)], summaries["fp32_s0"]["config"])
    write_ptq(rd, "fp32_s1", [("fp32", 32, "none", 90.7), ("e4m3", 8, "none", 90.1),
                              ("e4m3", 8, "scaled", 90.6), ("posit4es0", 4, "none", 11.0),
                              ("posit4es0", 4, "scaled", 38.5)], summaries["fp32_s1"]["config"])
    return rd


def mean_std(xs):
    """Independent of the report's own statistics: sum/n and the n-1 sample deviation."""
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def table_rows(text, heading_start):
    """The cells of the markdown table under the first heading starting with heading_start."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(heading_start))
    rows = []
    for line in lines[i + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and not line.startswith("| ---") and not line.startswith("| --"):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows[0], {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}


@pytest.mark.slow
def test_table_numbers_fp32_difference_and_runs_not_finished(runs_dir, tmp_path):
    out = tmp_path / "results"
    res = report.make_report(runs_dir, out)
    text = (out / "results.md").read_text()
    header, rows = table_rows(text, "## resnet20, 3 epochs, batch 128, step schedule from lr 0.1,")
    assert header[:7] == ["configuration", "config", "bits", "n", "test acc (%)", "std", "vs FP32"]
    assert list(rows) == ["FP32", "FP8 e4m3", "Posit4"]            # FP32 first, then by width

    fp32_m, fp32_s = mean_std([91.3, 90.7])
    fp8_m, fp8_s = mean_std([89.9, 90.4])
    fp32, fp8, p4 = rows["FP32"], rows["FP8 e4m3"], rows["Posit4"]
    assert (fp32["bits"], fp32["n"], fp32["test acc (%)"], fp32["std"]) == \
        ("32", "2", f"{fp32_m:.2f}", f"{fp32_s:.2f}")
    assert fp32["vs FP32"] == "baseline"
    assert (fp8["bits"], fp8["n"], fp8["test acc (%)"], fp8["std"]) == \
        ("8", "2", f"{fp8_m:.2f}", f"{fp8_s:.2f}")
    assert fp8["vs FP32"] == f"{fp8_m - fp32_m:+.2f}"
    assert fp8["not finished"] == "1 interrupted"                  # seed 2 is not in the mean
    assert fp8["wall/run"] == "10m20s"                             # (600 + 640) / 2 = 620 s
    assert fp8["time/epoch"] == "3m18s"    # epochs of wall/3 - 10 + i s: mean (191 + 204.33) / 2
    assert fp8["hardware"] == "GPU A" and fp8["test images"] == "1000"
    assert ((p4["n"], p4["test acc (%)"], p4["vs FP32"], p4["not finished"])
            == ("0", "-", "-", "1 diverged"))

    # the other experiment is a table of its own, with its own baseline
    _, other = table_rows(text, "## resnet20, 3 epochs, batch 128, step schedule from lr 0.05,")
    assert list(other) == ["FP32"] and other["FP32"]["test acc (%)"] == "85.00"
    assert other["FP32"]["std"] == "-" and other["FP32"]["n"] == "1"

    # every run that is not in the means is named, with status, epochs and last accuracy
    _, lost = table_rows(text, "## Runs not in the means")
    assert lost["posit4_s0"]["status"] == "diverged" and lost["posit4_s0"]["epochs"] == "1/3"
    assert lost["posit4_s0"]["last test acc (%)"] == "12.00"
    assert "NaN" in lost["posit4_s0"]["message"]
    assert lost["fp8_s2"]["status"] == "interrupted" and lost["fp8_s2"]["epochs"] == "2/3"
    assert lost["broken"]["status"] == "no summary.json"
    assert res["runs"] == 7 and res["finished"] == 5 and res["not_finished"] == 3
    assert f"runs in `{runs_dir}`" in text                         # outside the repo: as given

    # post-training quantization: mean over the two checkpoints, beside the trained FP8 row
    _, ptq = table_rows(text, "### Post-training quantization of FP32")
    e4 = ptq["e4m3"]
    m, s = mean_std([91.0, 90.1])
    assert e4["PTQ, unscaled"] == f"{m:.2f} ± {s:.2f}"
    m, s = mean_std([91.2, 90.6])
    assert e4["PTQ, scaled"] == f"{m:.2f} ± {s:.2f}"
    assert e4["trained in this format (weights)"] == f"{fp8_m:.2f} ± {fp8_s:.2f} (FP8 e4m3)"
    assert ptq["posit4es0"]["trained in this format (weights)"] == "-"   # it diverged
    assert ptq["fp32 (no cast)"]["PTQ, unscaled"] == f"{fp32_m:.2f} ± {fp32_s:.2f}"

    for name in ("acc_per_epoch.png", "acc_vs_bits.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
        assert f"]({name})" in text
        import matplotlib.image
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500


def test_runs_folder_inside_the_repo_is_named_relative_to_it():
    """results.md is committed: a runs folder in the repo must not show this machine's path."""
    assert report.shown(cli.REPO_ROOT / "runs") == "runs/"
    assert report.shown(cli.REPO_ROOT / "runs" / ".." / "runs" / "sub") == "runs/sub/"


def test_filters_and_no_plots(runs_dir, tmp_path):
    out = tmp_path / "r"
    res = report.make_report(runs_dir, out, model="resnet20", epochs=3, plots=False)
    assert res["plots"] == [] and not list(out.glob("*.png"))
    with pytest.raises(cli.UserError, match="no runs matching the filters"):
        report.make_report(runs_dir, out, epochs=164)
    with pytest.raises(cli.UserError, match="no runs matching the filters"):
        report.make_report(runs_dir, out, data="synthetic")


def test_cli_errors_are_one_line(tmp_path, capsys):
    import report as report_cli  # the entry point at the repo root

    for argv, needle in ([["--runs-dir", str(tmp_path / "missing")], "no such folder"],
                         [["--runs-dir", str(tmp_path)], "no runs in"],
                         [["--runs-dir", str(tmp_path), "--epochs", "0"], "--epochs must be >= 1"]):
        with pytest.raises(SystemExit) as e:
            cli.run_main(report_cli.main, argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def write_predictions(runs_dir, name, correct):
    """A run's predictions.json from a 0/1 list (labels all 0; predicted 0 where right, else 1)."""
    report.runs.write_predictions(runs_dir / name, [0 if c else 1 for c in correct],
                                  [0] * len(correct))


def test_paired_ci_and_csv(runs_dir, tmp_path):
    """Rows with per-image predictions get the bootstrap interval of common.report.stats on
    exactly their seeds' right/wrong rows; the CSV holds the documented columns and the same
    numbers."""
    import csv

    from common.report.stats import paired_bootstrap

    n = 1000
    fp32 = [[1] * 913 + [0] * 87, [1] * 907 + [0] * 93]
    fp8 = [[1] * 899 + [0] * 101, [0] * 10 + [1] * 904 + [0] * 86]      # 89.9 and 90.4, as RUNS
    for name, rows in (("fp32_s0", fp32[0]), ("fp32_s1", fp32[1]), ("fp8_s0", fp8[0]),
                       ("fp8_s1", fp8[1])):
        assert len(rows) == n
        write_predictions(runs_dir, name, rows)
    out = tmp_path / "results"
    report.make_report(runs_dir, out, plots=False)
    want = paired_bootstrap(fp8, fp32)
    _, rows = table_rows((out / "results.md").read_text(),
                         "## resnet20, 3 epochs, batch 128, step schedule from lr 0.1,")
    assert rows["FP8 e4m3"]["95% CI"] == f"[{want.ci_low:+.2f}, {want.ci_high:+.2f}]"
    assert rows["FP8 e4m3"]["resolved"] == ("yes" if want.resolved else "no: within noise")
    assert (rows["FP8 e4m3"]["vs FP32"]
            == f"{100 * (sum(map(sum, fp8)) - sum(map(sum, fp32))) / 2000:+.2f}")

    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(report.CSV_COLUMNS)
    for col in ("config", "label", "recipe", "model", "epochs", "seeds", "test_images", "acc_mean",
                "acc_std", "diff_vs_fp32", "ci_low", "ci_high"):
        assert col in table[0]
    fp8_row = next(r for r in table if r["label"] == "FP8 e4m3")
    assert fp8_row["seeds"] == "2" and fp8_row["recipe"] == "paper" and fp8_row["epochs"] == "3"
    assert float(fp8_row["ci_low"]) == pytest.approx(want.ci_low, abs=1e-4)
    assert float(fp8_row["ci_high"]) == pytest.approx(want.ci_high, abs=1e-4)
    assert float(fp8_row["acc_mean"]) == pytest.approx((89.9 + 90.4) / 2, abs=1e-4)
    assert {r["config"] for r in table if r["label"] == "FP32"} == {"fp32"}   # the sweep's key


def test_repeats_of_a_seed_count_once(tmp_path):
    """Two seed-0 FP32 runs (script name and sweep name) are one seed: n=1, the repeat named."""
    rd = tmp_path / "runs"
    rd.mkdir()
    write_run(rd, "fp32_resnet20_s0", "FP32", FP32, 0, "finished", [50.0, 70.0, 90.0], 300.0, "A")
    s = write_run(rd, "fp32_resnet20_paper_e3_s0", "FP32", FP32, 0, "finished",
                  [50.0, 70.0, 91.0], 300.0, "A")
    s["updated_at"] = "2026-01-01T00:00:00"                      # the newer one is kept
    (rd / "fp32_resnet20_paper_e3_s0" / "summary.json").write_text(json.dumps(s))
    write_run(rd, "fp32_again_s0", "FP32", FP32, 0, "interrupted", [50.0], 100.0, "A")
    write_run(rd, "fp32_resnet20_paper_e3_s1", "FP32", FP32, 1, "finished", [50.0, 70.0, 89.0],
              300.0, "A")
    out = tmp_path / "out"
    res = report.make_report(rd, out, plots=False)
    _, rows = table_rows((out / "results.md").read_text(), "## resnet20")
    assert rows["FP32"]["n"] == "2"
    assert rows["FP32"]["test acc (%)"] == f"{(91.0 + 89.0) / 2:.2f}"
    assert len(res["repeats"]) == 2
    assert all("fp32_resnet20_paper_e3_s0" in line.split("a repeat of")[1]
               for line in res["repeats"])
    text = (out / "results.md").read_text()
    assert "## Repeats not counted as seeds" in text and "fp32_again_s0" in text


def test_runs_on_other_test_images_make_their_own_table(tmp_path):
    """The 1,000-image subset and the full 10,000 are two experiments: their seeds are neither
    averaged into one row nor taken for repeats of each other; a run that stopped before its
    first evaluation joins the table of its experiment's only test set."""
    rd = tmp_path / "runs"
    rd.mkdir()
    write_run(rd, "fp32_sub_s0", "FP32", FP32, 0, "finished", [50.0, 70.0, 90.0], 300.0, "A")
    write_run(rd, "fp32_sub_s1", "FP32", FP32, 1, "finished", [50.0, 70.0, 91.0], 300.0, "A")
    s = write_run(rd, "fp8_early_s0", "FP8 e4m3", FP8, 0, "interrupted", [40.0], 10.0, "A")
    del s["test_images"]
    s.update(epochs_done=0, last_test_acc=None)                  # stopped in its first epoch
    (rd / "fp8_early_s0" / "summary.json").write_text(json.dumps(s))
    res = report.make_report(rd, tmp_path / "one", plots=False)
    _, sub = table_rows((tmp_path / "one" / "results.md").read_text(), "## resnet20")
    assert res["sections"] == 1 and sub["FP8 e4m3"]["not finished"] == "1 interrupted"

    (rd / "fp8_early_s0" / "summary.json").unlink()
    for seed, acc in ((0, 92.0), (1, 93.0)):
        s = write_run(rd, f"fp32_full_s{seed}", "FP32", FP32, seed, "finished", [50.0, 70.0, acc],
                      300.0, "A")
        s["test_images"] = 10000
        (rd / f"fp32_full_s{seed}" / "summary.json").write_text(json.dumps(s))
    res = report.make_report(rd, tmp_path / "two", plots=False)
    text = (tmp_path / "two" / "results.md").read_text()
    assert res["sections"] == 2 and not res["repeats"]
    headings = [line for line in text.splitlines() if line.startswith("## resnet20")]
    assert ["10,000 test images" in h for h in headings] == [True, False]   # the full set first
    _, sub = table_rows(text, headings[1])
    assert (sub["FP32"]["n"], sub["FP32"]["test acc (%)"], sub["FP32"]["test images"]) == \
        ("2", "90.50", "1000")
    _, full = table_rows(text, headings[0])
    assert (full["FP32"]["n"], full["FP32"]["test acc (%)"], full["FP32"]["test images"]) == \
        ("2", "92.50", "10000")


def test_predictions_that_disagree_with_the_accuracy_get_no_interval(runs_dir, tmp_path):
    """A predictions.json whose right answers are not the summary's accuracy (stale, or another
    run's) is not used for the paired interval: the row says which run, instead of a CI."""
    for name, right in (("fp32_s0", 913), ("fp32_s1", 907), ("fp8_s0", 899), ("fp8_s1", 894)):
        write_predictions(runs_dir, name, [1] * right + [0] * (1000 - right))
    out = tmp_path / "results"
    report.make_report(runs_dir, out, plots=False)
    _, rows = table_rows((out / "results.md").read_text(), "## resnet20, 3 epochs, batch 128")
    assert rows["FP8 e4m3"]["95% CI"] == "-"
    assert rows["FP8 e4m3"]["resolved"] == "predictions of fp8_s1 disagree with its accuracy"


def test_default_output_is_not_the_committed_results(tmp_path):
    """A bare `python report.py` writes under runs/ (git-ignored), never over results/."""
    import subprocess
    root = report.REPO_ROOT
    import report as report_cli
    out = report_cli.build_parser().parse_args([]).out
    assert report.runs.Path(out).resolve() != (root / "results").resolve()
    ignored = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", str(out)])
    assert ignored.returncode == 0


def test_plot_data_true_bit_widths_family_panels_and_short_run_ticks(runs_dir, tmp_path):
    """PTQ markers are at their format's real bit width (drawn beside each other only where
    they would hide one another: ``drawn_x``); the per-epoch plot
    has one panel per family, FP32 in each; a 1-epoch run gets the single tick 1. A cast with
    other settings (--first-last-fp32) stays out of the plot: one marker per format and scaling."""
    other = json.loads((runs_dir / "fp32_s0" / "ptq.json").read_text())
    (runs_dir / "fp32_s0" / "ptq_first-last-fp32.json").write_text(
        json.dumps({**other, "first_last_fp32": True}))
    all_runs, _ = report.load_runs(runs_dir)
    sections = report.build_sections([r for r in all_runs if r.config["lr"] == 0.1])
    ptq = report.group_ptq(report.load_ptq(runs_dir))
    points = report.plot_bits(sections, ptq, tmp_path / "bits.png")["points"]
    ptq_x = sorted((p.label, p.x) for p in points if p.panel == "ptq")
    assert ptq_x == [("e4m3", 8), ("e4m3 sc.", 8), ("posit4es0", 4), ("posit4es0 sc.", 4)]
    trained = {p.label: (p.x, p.y) for p in points if p.panel == "trained"}
    assert trained["fp32"][0] == 32 and trained["fp8-e4m3"] == (8, pytest.approx((89.9 + 90.4) / 2))

    panels = report.plot_epochs(sections, tmp_path / "ep.png")
    assert [p["title"].split(":")[0] for p in panels] == ["FP8", "Posits"]
    for p in panels:
        assert p["lines"][0] == "FP32 (n=2)"
        assert p["xticks"] == [1.0, 2.0, 3.0]

    one = tmp_path / "one"
    one.mkdir()
    write_run(one, "fp32_s0", "FP32", FP32, 0, "finished", [40.0], 100.0, "A", epochs=1)
    write_run(one, "fp8_s0", "FP8", FP8, 0, "finished", [38.0], 100.0, "A", epochs=1)
    panels = report.plot_epochs(report.build_sections(report.load_runs(one)[0]), tmp_path / "1.png")
    assert panels[0]["xticks"] == [1.0]


def test_spread_labels_keeps_a_gap_and_order():
    ys = [90.0, 90.2, 90.1, 40.0]
    out = report.plots._spread_labels(ys, 2.0)
    assert sorted(range(4), key=lambda i: out[i]) == sorted(range(4), key=lambda i: ys[i])
    ordered = sorted(out)
    assert all(b - a >= 2.0 - 1e-9 for a, b in zip(ordered, ordered[1:]))


def test_corrupt_summary_is_named_unreadable_not_missing(runs_dir, tmp_path):
    (runs_dir / "fp8_s1" / "summary.json").write_text("{ not json")
    (runs_dir / "junk").mkdir()
    (runs_dir / "junk" / "summary.json").write_text("[1, 2]")
    out = tmp_path / "r"
    report.make_report(runs_dir, out, plots=False)
    _, lost = table_rows((out / "results.md").read_text(), "## Runs not in the means")
    assert lost["junk"]["status"] == "unreadable" and "summary.json" in lost["junk"]["message"]
    assert "fp8_s1" in lost and lost["fp8_s1"]["status"] == "unreadable"


def test_fp4_configurations_share_a_panel_at_their_own_bit_widths(tmp_path):
    """Runs of the sweep's fp4, fp4-mx and fp4-nv, with the formats and labels the FP4 script
    records: three rows told apart by label and config key, one FP4 panel beside FP32, and the
    bits plot puts E2M1 at 4, MXFP4 at 4.25 and NVFP4 at 4.5 bits (block scales included), as
    their PTQ rows."""
    import importlib.util

    from common import sweep

    spec = importlib.util.spec_from_file_location("fp4_script",
                                                  cli.REPO_ROOT / "FP4" / "train_cifar10_fp4.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rd = tmp_path / "runs"
    rd.mkdir()
    fp32 = write_run(rd, "fp32_resnet20_paper_e3_s0", "FP32", FP32, 0, "finished",
                     [50.0, 60.0, 70.0], 100.0, "A")
    labels = {}
    for key, acc in (("fp4", 60.0), ("fp4-mx", 65.0), ("fp4-nv", 68.0)):
        config = script.plan(list(sweep.CONFIGS[key].flags))["config"]
        labels[key] = config.label
        write_run(rd, f"{key}_resnet20_paper_e3_s0", config.label, config.format, 0, "finished",
                  [40.0, 50.0, acc], 100.0, "A")
    assert len(set(labels.values())) == 3
    write_ptq(rd, "fp32_resnet20_paper_e3_s0",
              [("fp32", 32, "none", 70.0), ("mxfp4", 4.25, "none", 61.0),
               ("nvfp4", 4.5, "none", 66.0)], fp32["config"])
    sections = report.build_sections(report.load_runs(rd)[0])
    points = report.plot_bits(sections, report.group_ptq(report.load_ptq(rd)), tmp_path / "b.png")
    x_of = {(p.label, p.panel): p.x for p in points["points"]}
    assert [x_of[(k, "trained")] for k in ("fp4", "fp4-mx", "fp4-nv")] == [4, 4.25, 4.5]
    assert (x_of[("mxfp4", "ptq")], x_of[("nvfp4", "ptq")]) == (4.25, 4.5)
    panels = report.plot_epochs(sections, tmp_path / "e.png")
    assert len(panels) == 1 and panels[0]["title"].startswith("FP4")
    lines = [line.split(" (n=")[0] for line in panels[0]["lines"]]
    assert lines[0] == "FP32" and sorted(lines[1:]) == sorted(labels.values())
    out = tmp_path / "results"
    report.make_report(rd, out, plots=False)
    _, rows = table_rows((out / "results.md").read_text(), "## resnet20")
    assert {rows[labels[k]]["config"] for k in labels} == set(labels)
    assert [rows[labels[k]]["bits"] for k in ("fp4", "fp4-mx", "fp4-nv")] == ["4", "4.25", "4.5"]


def test_bit_plot_label_columns_never_share_a_gap():
    """6.25, 8 and 8.25 bits form one column; the leftmost column's labels go left (into the
    margin), every other column's right, anchored at the column's end: no two columns write
    into the same gap (they were drawn over each other when trained labels went right and PTQ
    labels left of the next column)."""
    points = [(8, 90.2, "fp8-e5m2w", "r"), (16, 90.3, "posit16es1", "k"),
              (6.25, 90.4, "mxfp6", "k"), (8.25, 89.6, "mxfp8", "k"),
              (4, 9.8, "e2m1", "k"), (4.5, 87.9, "nvfp4", "k")]
    columns = report.plots._label_columns(points)
    assert [sorted(p[2] for p in c) for c in columns] == [
        ["e2m1", "nvfp4"], ["fp8-e5m2w", "mxfp6", "mxfp8"], ["posit16es1"]]
    where = {p[2]: (p[3], p[5]) for c in columns for p in c}
    assert where["e2m1"] == where["nvfp4"] == (-1, 4)
    assert where["mxfp6"] == where["fp8-e5m2w"] == where["mxfp8"] == (1, 8.25)
    assert where["posit16es1"] == (1, 16)
    spread = report.plots._spread_labels([p[1] for p in columns[1]], 3.6)
    ordered = sorted(spread)
    assert all(b - a >= 3.6 - 1e-9 for a, b in zip(ordered, ordered[1:]))


def test_table_states_the_wall_time_of_its_finished_runs(runs_dir, tmp_path):
    """The cost of a table: the wall time of its finished runs summed (300 + 330 + 600 + 640 s);
    the interrupted and diverged runs are not counted."""
    out = tmp_path / "results"
    report.make_report(runs_dir, out, plots=False)
    md = (out / "results.md").read_text()
    assert "The 4 finished runs of this table took 31m10s of wall time in all" in md
    # epochs logged at wall/3 - 10, -9, -8 s: median wall/3 - 9, times 3 epochs = wall - 27 s
    assert "At each run's median epoch time, which a pause or a busy stretch hardly moves, they " \
           "take 29m22s." in md


def test_table_states_the_cpu_time_of_the_runs_that_count_it(runs_dir, tmp_path):
    """CPU time is summed over the finished runs that record it (older records have none)."""
    for name, cpu in (("fp32_s0", 1200.0), ("fp32_s1", 2400.5)):   # two runs of the main table
        path = runs_dir / name / "summary.json"
        s = json.loads(path.read_text())
        path.write_text(json.dumps({**s, "cpu_seconds": cpu}))
    out = tmp_path / "results"
    report.make_report(runs_dir, out, plots=False)
    md = (out / "results.md").read_text()
    assert "2 of them count their CPU time" in md and "1h00m of CPU time in all" in md


def test_accuracy_against_epochs_table_and_csv(runs_dir, tmp_path):
    """FP32 trained to 3 epochs (2 seeds) and 5 epochs (1 seed) with the same flags makes a curve
    of two rows, kept even when --epochs picks the 3-epoch runs; FP8 (one epoch count) and the
    lr-0.05 FP32 run (other flags) are not on it."""
    write_run(runs_dir, "fp32_e5_s0", "FP32", FP32, 0, "finished",
              [50.0, 70.0, 80.0, 88.0, 92.1], 500.0, "GPU A", epochs=5)
    out = tmp_path / "results"
    report.make_report(runs_dir, out, plots=False, epochs=EPOCHS)
    md = (out / "results.md").read_text()
    assert "this table ignores --epochs 3" in md
    header, _ = table_rows(md, "## Accuracy against epochs")
    lines = md.split("## Accuracy against epochs")[1].split("\n## ")[0].splitlines()
    rows = [[c.strip() for c in ln.strip().strip("|").split(" | ")] for ln in lines
            if ln.startswith("| FP")]
    got = [dict(zip(header, r)) for r in rows]
    assert [(r["config"], r["epochs"], r["seeds"]) for r in got] == [
        ("fp32", "3", "0, 1"), ("fp32", "5", "0")]
    m, s = mean_std([91.3, 90.7])
    assert got[0]["test acc (%)"] == f"{m:.2f}" and got[0]["std"] == f"{s:.2f}"
    assert got[1]["test acc (%)"] == "92.10" and got[1]["std"] == "-"
    # epochs logged at wall/5 - 10 + i: median wall/5 - 8, times 5 epochs = 500 - 40 s
    assert got[1]["time/run"] == "7m40s"
    csv_lines = (out / "acc_vs_epochs.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == list(report.EPOCHS_COLUMNS)
    last = dict(zip(report.EPOCHS_COLUMNS, csv_lines[2].split(",")))
    assert last["epochs"] == "5" and last["acc_mean"] == "92.1000"
    assert abs(float(last["hours_per_run"]) - 460.0 / 3600) < 1e-4


def test_no_epoch_table_without_a_curve(runs_dir, tmp_path):
    """Every format at one epoch count: no 'Accuracy against epochs' section, and no CSV, not
    even one an earlier report left in the folder."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "acc_vs_epochs.csv").write_text("config\nstale\n")
    report.make_report(runs_dir, out, plots=False)
    assert "Accuracy against epochs" not in (out / "results.md").read_text()
    assert not (out / "acc_vs_epochs.csv").exists()


# The headline experiment's shape: all 10,000 test images, FP32 at 5 seeds, the others at 3.
FULL = {"FP32": (FP32, "fp32", [91.0, 91.5, 92.0, 91.0, 91.5]),
        "FP8 e4m3": (FP8, "fp8", [91.2, 91.4, 91.0]),
        "Posit4": (P4, "posit4", [80.0, 90.0, 85.0])}


def write_full_set(rd, labels=tuple(FULL)):
    """Finished runs scored on 10,000 images, with predictions (seed s gets the first
    100 x accuracy images right); returns {label: one 0/1 row per seed}."""
    rows = {}
    for label in labels:
        fmt, prefix, accs = FULL[label]
        rows[label] = []
        for seed, acc in enumerate(accs):
            name = f"{prefix}_full_s{seed}"
            s = write_run(rd, name, label, fmt, seed, "finished", [50.0, 70.0, acc], 300.0, "A")
            (rd / name / "summary.json").write_text(json.dumps({**s, "test_images": 10000}))
            right = round(100 * acc)
            rows[label].append([1] * right + [0] * (10000 - right))
            write_predictions(rd, name, rows[label][-1])
    return rows


@pytest.mark.slow
def test_csv_and_table_have_both_intervals_and_where_they_disagree(tmp_path):
    """FP8 against FP32 by hand: means 91.2 and 91.4; variances 0.04 (n 3) and 0.175 (n 5), so
    squared standard errors 0.013333 and 0.035, sum 0.048333 (SE 0.219848); Welch's df =
    0.048333^2 / (0.013333^2/2 + 0.035^2/4) = 0.0023361 / 0.00039514 = 5.912. Both intervals hold
    0: the methods agree. Posit4's seeds (80, 90, 85) spread so far that Welch's interval holds 0
    (SE 2.8928, df 2.017), while every bootstrap resample is below FP32 (no seed of Posit4 beats
    90, none of FP32 is under 91): resolved by the bootstrap only, flagged as a disagreement."""
    import csv

    from common.report.stats import paired_bootstrap, t_quantile

    rd = tmp_path / "runs"
    rd.mkdir()
    rows = write_full_set(rd)
    out = tmp_path / "results"
    report.make_report(rd, out, plots=False)
    with open(out / "results.csv", newline="") as f:
        table = {r["label"]: r for r in csv.DictReader(f)}
    for col in ("ci_half_width", "t_ci_low", "t_ci_high", "t_df", "t_resolved", "methods_disagree"):
        assert col in report.CSV_COLUMNS and table["FP32"][col] == ""

    fp8 = table["FP8 e4m3"]
    se2 = 0.04 / 3 + 0.175 / 5
    df = se2 ** 2 / ((0.04 / 3) ** 2 / 2 + (0.175 / 5) ** 2 / 4)
    assert df == pytest.approx(5.912, abs=1e-3)
    assert float(fp8["t_df"]) == pytest.approx(df, abs=1e-4)
    half = t_quantile(0.975, df) * math.sqrt(se2)
    assert float(fp8["diff_vs_fp32"]) == pytest.approx(-0.2, abs=1e-4)
    assert float(fp8["t_ci_low"]) == pytest.approx(-0.2 - half, abs=1e-4)
    assert float(fp8["t_ci_high"]) == pytest.approx(-0.2 + half, abs=1e-4)
    want = paired_bootstrap(rows["FP8 e4m3"], rows["FP32"])
    assert float(fp8["ci_half_width"]) == pytest.approx((want.ci_high - want.ci_low) / 2, abs=1e-4)
    assert (fp8["resolved"], fp8["t_resolved"], fp8["methods_disagree"]) == ("no", "no", "no")

    p4 = table["Posit4"]
    assert float(p4["ci_high"]) < -1.0 < 0.0 < float(p4["t_ci_high"])
    assert float(p4["t_df"]) == pytest.approx(2.017, abs=1e-3)
    assert (p4["resolved"], p4["t_resolved"], p4["methods_disagree"]) == ("yes", "no", "yes")

    text = (out / "results.md").read_text()
    _, md = table_rows(text, "## resnet20")
    assert md["FP8 e4m3"]["t-interval"] == f"[{-0.2 - half:+.2f}, {-0.2 + half:+.2f}]"
    assert md["FP8 e4m3"]["±"] == f"{(want.ci_high - want.ci_low) / 2:.2f}"
    assert md["FP8 e4m3"]["t resolved"] == "no"
    assert md["Posit4"]["t resolved"] == "no: bootstrap does"
    line = next(ln for ln in text.splitlines() if ln.startswith("The bootstrap and the t-interval"))
    assert "disagree" in line and "Posit4" in line and "FP8" not in line


def test_one_seed_has_no_t_interval(runs_dir, tmp_path):
    """With one FP32 seed the Welch interval is undefined: '-' and the reason, no CSV values."""
    import shutil
    shutil.rmtree(runs_dir / "fp32_s1")
    out = tmp_path / "results"
    report.make_report(runs_dir, out, plots=False)
    _, rows = table_rows((out / "results.md").read_text(),
                         "## resnet20, 3 epochs, batch 128, step schedule from lr 0.1,")
    assert rows["FP8 e4m3"]["t-interval"] == "-"
    assert rows["FP8 e4m3"]["t resolved"] == "-: needs 2+ seeds a side"
    csv_text = (out / "results.csv").read_text().splitlines()
    fp8 = dict(zip(report.CSV_COLUMNS, next(r for r in csv_text if r.startswith("fp8")).split(",")))
    assert fp8["t_ci_low"] == fp8["t_ci_high"] == fp8["methods_disagree"] == ""


@pytest.mark.slow
def test_fp32_against_the_paper_only_on_the_full_test_set(runs_dir, tmp_path):
    """The 10,000-image FP32 (91.0, 91.5, 92.0, 91.0, 91.5) against 91.25%: mean 91.4, gap
    +0.15; variance 0.7/4 = 0.175, SE sqrt(0.175/5) = 0.187083, t_{0.975,4} = 2.776445, half-width
    0.519432: t-interval [-0.369432, +0.669432]. The 1,000-image FP32 of the same folder gets no
    such line: its accuracy is not comparable to the paper's, which is on all 10,000."""
    from common.report.stats import one_sample_bootstrap

    rows = write_full_set(runs_dir)
    out = tmp_path / "results"
    res = report.make_report(runs_dir, out, plots=False)
    text = (out / "results.md").read_text()
    assert len(res["paper_gap"]) == 1
    gap = res["paper_gap"][0]
    assert (gap["seeds"], gap["gap"]) == (5, pytest.approx(0.15))
    assert (gap["t"].ci_low, gap["t"].ci_high) == (pytest.approx(-0.369432, abs=1e-5),
                                                   pytest.approx(0.669432, abs=1e-5))
    boot = one_sample_bootstrap(rows["FP32"], report.PAPER_RESNET20_ACC)
    lines = [ln for ln in text.splitlines() if "He et al. 2016" in ln]
    assert lines == [
        "FP32 mean 91.40% (5 seeds, 10,000 test images, recipe paper, 3 epochs) vs He et al. "
        f"2016 91.25% (164 epochs): gap +0.15 points, 95% CI [{boot.ci_low:+.2f}, "
        f"{boot.ci_high:+.2f}] (bootstrap over seeds and test images), t-interval [-0.37, +0.67]."]
    full = next(h for h in text.split("\n## ") if h.startswith("resnet20") and "10,000" in h)
    assert lines[0] in full                         # under the 10,000-image table only


@pytest.mark.slow
def test_forest_plot_of_the_largest_test_set(runs_dir, tmp_path):
    """forest.png shows the 10,000-image table (not the 1,000-image one, which has paired rows
    too): FP8 and Posit4 grouped under 8 and 4 bits, the band the median bootstrap half-width."""
    for name, right in (("fp32_s0", 913), ("fp32_s1", 907), ("fp8_s0", 899), ("fp8_s1", 904)):
        write_predictions(runs_dir, name, [1] * right + [0] * (1000 - right))
    write_full_set(runs_dir)
    out = tmp_path / "results"
    res = report.make_report(runs_dir, out)
    data = (out / report.PLOT_FOREST).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert out / report.PLOT_FOREST in res["plots"]
    assert f"]({report.PLOT_FOREST})" in (out / "results.md").read_text()

    sections = report.build_sections(report.load_runs(runs_dir)[0])
    for sec in sections:
        sec.compare_to_baseline()
    main = report.main_section(sections)
    assert main.config["test_images"] == 10000
    drawn = report.plot_forest(main, tmp_path / "f.png")
    assert drawn["groups"] == ["8 bits", "4 bits"]
    assert [r.split(" ")[0] for r in drawn["rows"]] == ["fp8-e4m3", "posit4"]
    assert all(r.endswith("(n=3)") for r in drawn["rows"])
    halves = sorted(g.paired.half_width for g in main.groups if g.paired)
    assert drawn["band"] == pytest.approx(sum(halves) / 2)       # median of two
    x0, x1 = drawn["xlim"]
    assert x0 < -6.4 and x1 > 0                  # Posit4's mean difference and the zero line


def test_no_forest_plot_without_fp32(tmp_path):
    """No FP32 row: nothing to compare with, so no forest.png, not even an earlier report's."""
    rd = tmp_path / "runs"
    rd.mkdir()
    write_full_set(rd, labels=("FP8 e4m3", "Posit4"))
    out = tmp_path / "results"
    out.mkdir()
    (out / report.PLOT_FOREST).write_bytes(PNG_MAGIC)
    res = report.make_report(rd, out)
    assert not (out / report.PLOT_FOREST).exists()
    assert out / report.PLOT_FOREST not in res["plots"] and (out / report.PLOT_BITS).exists()
    assert report.PLOT_FOREST not in (out / "results.md").read_text()
    assert res["paper_gap"] == []


def test_help_description_is_the_docstrings_first_sentence_whole():
    """--help starts with a whole sentence (it used to stop at the end of the docstring's
    first line), and --no-plots names every file it still writes."""
    import report as report_cli

    parser = report_cli.build_parser()
    text = " ".join(parser.description.split())
    assert text.startswith("Write the comparison table") and text.endswith(".")
    assert text.count(".") == text.count(".md") + text.count(".png") + text.count(".csv") + 1
    help_text = " ".join(parser.format_help().split())
    assert "results.md, results.csv and acc_vs_epochs.csv" in help_text


def test_damaged_metrics_line_leaves_the_run_out_with_a_warning(runs_dir, tmp_path, capsys):
    """A metrics.jsonl cut off mid-line (a run killed while writing it) does not stop the
    report: that run is left out, named with the file and line in a warning and in 'Runs not
    in the means', and the other runs make the table."""
    path = runs_dir / "fp8_s1" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + [lines[2][:17]]) + "\n")      # line 3 truncated
    out = tmp_path / "r"
    res = report.make_report(runs_dir, out, plots=False)
    assert len(res["warnings"]) == 1
    assert str(path) in res["warnings"][0] and "line 3" in res["warnings"][0]
    text = (out / "results.md").read_text()
    _, rows = table_rows(text, "## resnet20, 3 epochs, batch 128, step schedule from lr 0.1,")
    assert rows["FP8 e4m3"]["n"] == "1" and rows["FP8 e4m3"]["test acc (%)"] == "89.90"
    _, lost = table_rows(text, "## Runs not in the means")
    assert lost["fp8_s1"]["status"] == "unreadable"
    assert lost["fp8_s1"]["configuration"] == "FP8 e4m3"
    assert "metrics.jsonl, line 3: not JSON" in lost["fp8_s1"]["message"]

    import report as report_cli
    report_cli.main(["--runs-dir", str(runs_dir), "--out", str(out), "--no-plots"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "line 3" in err[0]


def test_configuration_keys_come_from_the_stored_config_not_the_run_name(tmp_path):
    """A run is the sweep's configuration whose script records the same format: a folder named
    anything gets fp8-e5m2w, and a folder whose name starts with 'fp32_' but holds another
    format does not get fp32."""
    from common.report import records

    known = records.known_configs()
    assert [k for k, _, _ in known] == list(report.records.CONFIGS)
    assert len({repr(rec) for _, _, rec in known}) == len(known)      # told apart by format
    script, fp8 = next((s, rec) for k, s, rec in known if k == "fp8-e5m2w")
    rd = tmp_path / "runs"
    rd.mkdir()
    s = write_run(rd, "my_own_name", "FP8 run", fp8.to_dict(), 0, "finished", [50.0, 60.0, 70.0],
                  100.0, "A")
    s["config"]["script"] = script
    (rd / "my_own_name" / "summary.json").write_text(json.dumps(s))
    write_run(rd, "fp32_but_fp8", "Hand-made FP8", FP8, 0, "finished", [50.0, 60.0, 70.0], 100.0,
              "A")
    keys = {r.name: r.config_key for r in report.load_runs(rd)[0]}
    assert keys == {"my_own_name": "fp8-e5m2w", "fp32_but_fp8": None}
    assert records.config_key({**s["config"], "script": "FP4/train_cifar10_fp4.py"}) is None
    groups = report.build_sections(report.load_runs(rd)[0])[0].groups
    assert sorted(g.config_key for g in groups) == ["fp8-e5m2w", "hand-made-fp8"]


def test_one_colour_per_configuration_the_same_in_every_figure(runs_dir, tmp_path):
    """config_colors gives each sweep configuration its own colour whatever else is in the
    report, other keys distinct ones too; the three figures draw each configuration in it."""
    from common import sweep

    keys = list(sweep.CONFIGS) + ["made-up-a", "made-up-b"]
    colors = report.config_colors(keys)
    assert len(set(colors.values())) == len(keys) and colors["fp32"] == "#000000"
    assert report.config_colors(reversed(keys)) == colors
    assert report.config_colors(["posit8", "other"])["posit8"] == colors["posit8"]

    for name, right in (("fp32_s0", 913), ("fp32_s1", 907), ("fp8_s0", 899), ("fp8_s1", 904)):
        write_predictions(runs_dir, name, [1] * right + [0] * (1000 - right))
    sections = report.build_sections(report.load_runs(runs_dir)[0])
    for sec in sections:
        sec.compare_to_baseline()
    colors = report.config_colors(g.config_key for s in sections for g in s.groups)
    key_of = {g.label: g.config_key for s in sections for g in s.groups}
    for panel in report.plot_epochs(sections, tmp_path / "e.png", colors):
        assert all(colors[key_of[label]] == c for label, c in panel["colors"].items())
    points = report.plot_bits(sections, [], tmp_path / "b.png", colors)["points"]
    assert all(p.color == colors[p.label] for p in points)
    forest = report.plot_forest(report.main_section(sections), tmp_path / "f.png", colors)
    assert forest["colors"] == {"fp8-e4m3 (n=2)": colors["fp8-e4m3"]}
    assert report.plot_forest(report.main_section(sections), tmp_path / "g.png")["colors"] == \
        forest["colors"]                                     # the same without being told


def test_bit_plot_zooms_the_trained_panel_and_keeps_legends_off_the_data(runs_dir, tmp_path):
    """Trained accuracies all above 50%: the trained panel's y axis is its own and leaves 0 out,
    while the PTQ panel (casts at 10%) keeps its range; every legend of the bits and epoch plots
    lies outside its axes."""
    all_runs, _ = report.load_runs(runs_dir)
    sections = report.build_sections([r for r in all_runs if r.config["lr"] == 0.1])
    drawn = report.plot_bits(sections, report.group_ptq(report.load_ptq(runs_dir)),
                             tmp_path / "b.png")
    ylim = {p["panel"]: p["ylim"] for p in drawn["panels"]}
    trained = [p.y for p in drawn["points"] if p.panel == "trained"]
    assert min(trained) > 50 and ylim["trained"][0] > 50 and ylim["trained"][1] < 100
    assert ylim["ptq"][0] < 10
    panels = drawn["panels"] + report.plot_epochs(sections, tmp_path / "e.png")
    for p in panels:
        ax0, ay0, ax1, ay1 = p["axes_box"]
        lx0, ly0, lx1, ly1 = p["legend_box"]
        assert ly1 <= ay0 or ly0 >= ay1 or lx1 <= ax0 or lx0 >= ax1    # no overlap


def test_dodge_puts_markers_that_would_hide_each_other_side_by_side():
    """Three markers at 8 bits and one accuracy go side by side, a step apart, the first at 8;
    one far below stays at 8, as does a marker alone; an error bar reaching another marker
    counts as overlap."""
    import math

    from common.report import plots

    xs = plots.dodge([8, 8, 8, 8, 16], [90.0, 90.1, 89.9, 60.0, 90.0], dy=0.5, step=0.1)
    logs = sorted(math.log2(x) for x in xs[:3])
    assert xs[0] == 8 and all(b - a >= 0.1 - 1e-9 for a, b in zip(logs, logs[1:]))
    assert xs[3] == 8 and xs[4] == 16
    assert plots.dodge([4, 4], [82.0, 79.5], dy=0.5, step=0.1) == [4, 4]
    assert plots.dodge([4, 4], [82.0, 79.5], dy=0.5, step=0.1, errs=[3.5, 1.6])[1] != 4


def test_labels_keep_off_the_fp32_line():
    """Labels within half a gap of the FP32 line move off it, on their side, and keep their
    order and spacing."""
    from common.report import plots

    ys = [89.0, 90.3, 90.5, 90.9, 92.0]
    out = plots._clear_of_line(ys, 90.45, 0.6)
    assert all(abs(y - 90.45) >= 0.3 - 1e-9 for y in out)
    assert sorted(range(5), key=lambda i: out[i]) == list(range(5))
    assert out[0] == 89.0 and out[1] <= 90.15 and out[2] >= 90.75 and out[3] >= out[2] + 0.6


def test_gemm_rows_are_compared_with_their_tensor_role_row(tmp_path):
    """A configuration that names the row it changes (fp4-nv-gemm-fl: fp4-nv-fl) gets a second
    table and the compared_with CSV columns: the paired bootstrap and Welch interval of its
    seeds against that row's, not against FP32."""
    import csv

    from common.report import records
    from common.report.stats import paired_bootstrap, welch_interval

    known = {k: (s, rec) for k, s, rec in records.known_configs()}
    rd = tmp_path / "runs"
    rd.mkdir()
    n = 1000
    rows = {"fp32": ([1] * 905 + [0] * 95, [0] * 5 + [1] * 905 + [0] * 90),
            "fp4-nv-fl": ([1] * 880 + [0] * 120, [1] * 890 + [0] * 110),
            "fp4-nv-gemm-fl": ([0] * 30 + [1] * 870 + [0] * 100, [1] * 902 + [0] * 98)}
    for key, seeds in rows.items():
        script, rec = known[key]
        for seed, correct in enumerate(seeds):
            assert len(correct) == n
            name = f"{key}_s{seed}"
            acc = 100 * sum(correct) / n
            s = write_run(rd, name, key.upper(), rec.to_dict(), seed, "finished",
                          [50.0, 60.0, acc], 100.0, "A")
            s["config"]["script"] = script
            (rd / name / "summary.json").write_text(json.dumps(s))
            write_predictions(rd, name, correct)
    out = tmp_path / "results"
    report.make_report(rd, out, plots=False)
    want = paired_bootstrap(rows["fp4-nv-gemm-fl"], rows["fp4-nv-fl"])
    accs = {k: [100 * sum(c) / n for c in v] for k, v in rows.items()}
    welch = welch_interval(accs["fp4-nv-gemm-fl"], accs["fp4-nv-fl"])
    text = (out / "results.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("| FP4-NV-GEMM-FL | fp4-nv-gemm-fl")
                and "fp4-nv-fl" in x)
    assert f"[{want.ci_low:+.2f}, {want.ci_high:+.2f}]" in line
    assert f"[{welch.ci_low:+.2f}, {welch.ci_high:+.2f}]" in line
    assert f"{want.diff:+.2f}" in line
    with open(out / "results.csv", newline="") as f:
        table = {r["config"]: r for r in csv.DictReader(f)}
    gemm = table["fp4-nv-gemm-fl"]
    assert gemm["compared_with"] == "fp4-nv-fl"
    assert float(gemm["cmp_ci_low"]) == pytest.approx(want.ci_low, abs=1e-4)
    assert float(gemm["cmp_ci_high"]) == pytest.approx(want.ci_high, abs=1e-4)
    assert float(gemm["cmp_t_ci_low"]) == pytest.approx(welch.ci_low, abs=1e-4)
    assert float(gemm["diff_vs_compared"]) == pytest.approx(want.diff, abs=1e-4)
    assert table["fp4-nv-fl"]["compared_with"] == ""                   # no partner of its own
    assert float(gemm["ci_low"]) != pytest.approx(want.ci_low, abs=1e-4)   # FP32's is another


def test_curve_averages_only_the_epochs_every_run_scored(tmp_path):
    """A seed trained with --eval-every 2 scores epochs 2 and 4 only: the mean curve over it and a
    seed scored every epoch has those two points, each the mean of both runs."""
    from common.report import records
    write_run(tmp_path, "fp32_s0", "FP32", FP32, 0, "finished", [50.0, 70.0, 80.0, 90.0], 400.0,
              "GPU A", epochs=4)
    write_run(tmp_path, "fp32_s1", "FP32", FP32, 1, "finished", [None, 72.0, None, 92.0], 400.0,
              "GPU A", epochs=4)
    runs_found, _ = records.load_runs(tmp_path)
    (section,) = records.build_sections(runs_found)
    epochs, mean, low, high, finished = section.groups[0].curve()
    assert finished and epochs == [2, 4] and mean == [71.0, 91.0]
    assert low == [70.0, 90.0] and high == [72.0, 92.0]
