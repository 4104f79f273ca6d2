"""Post-training quantization: fp32 equals the training loop's own evaluation exactly; the bf16 row
equals an evaluation with torch's native bf16 casts; the other formats stay sane; one-line
errors."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from common import cli, ptq, runs, train
from common import data as data_mod

SMOKE = ["--synthetic", "--model", "resnet8", "--batch-size", "32", "--epochs", "1",
         "--max-steps-per-epoch", "3", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny FP32 run made by the training loop; returns its run folder."""
    tmp = tmp_path_factory.mktemp("ptq")
    args = cli.parse_args(cli.build_parser("t"), [*SMOKE, "--runs-dir", str(tmp), "--name", "tiny"])
    train.run(cli.make_config(args, label="FP32", format={"name": "fp32", "bits_per_element": 32},
                              script="tests"))
    return tmp / "tiny"


@pytest.mark.slow
def test_fp32_equals_the_loops_evaluation_exactly(trained):
    res = ptq.run_ptq(trained / "last.pt", formats=("bf16", "e4m3", "e2m1", "posit8es1"),
                      device="cpu")
    loop = runs.read_jsonl(trained / "metrics.jsonl")[-1]
    fp32 = res["results"][0]
    assert fp32["format"] == "fp32"
    assert fp32["test_acc"] == loop["test_acc"] and fp32["test_loss"] == loop["test_loss"]
    assert fp32["test_images"] == loop["test_images"] == 256
    assert res["source"]["trained_test_acc"] == loop["test_acc"]

    rows = {(r["format"], r["scaling"]): r for r in res["results"][1:]}
    assert set(rows) == {(f, s) for f in ("bf16", "e4m3", "e2m1", "posit8es1")
                         for s in ("none", "scaled")}
    assert rows["e2m1", "scaled"]["weight_scaling"] == "channel"
    assert rows["e2m1", "scaled"]["act_scaling"] == "tensor"
    for r in rows.values():
        assert 0 <= r["test_acc"] <= 100 and math.isfinite(r["test_loss"])
        assert r["test_images"] == 256
    # bf16 keeps 8 significant bits: the loss moves a little; 4-bit e2m1 moves it a lot
    assert rows["bf16", "none"]["test_loss"] == pytest.approx(fp32["test_loss"], rel=2e-2)
    assert rows["e2m1", "none"]["test_loss"] != fp32["test_loss"]
    assert rows["bf16", "none"]["test_loss"] != fp32["test_loss"]    # the casts did act

    on_disk = json.loads((trained / "ptq.json").read_text())
    assert on_disk["results"] == res["results"]


def test_bf16_row_equals_torchs_native_casts(trained):
    """Reference for the bf16 row, independent of common.quant: torch's native bfloat16 cast of
    every conv/linear weight (once) and input (per call, by a forward pre-hook)."""
    ckpt = runs.load_checkpoint(trained / "last.pt")
    config = cli.RunConfig.from_dict(ckpt["config"])
    dev = torch.device("cpu")
    model = ptq.load_model(config, ckpt["model"], dev, channels_last=True)
    data = data_mod.load_device_data(dev, None, synthetic=True)
    norm = data_mod.Normalizer(dev, channels_last=True)
    rows = ptq.evaluate_formats(model, data, norm, 1000, ["bf16"], ["none"])

    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                m.weight.copy_(m.weight.to(torch.bfloat16).float())
            m.register_forward_pre_hook(lambda mod, inp: (inp[0].to(torch.bfloat16).float(),))
    ev = train.evaluate(ref, data, norm, 1000)
    assert rows[1]["test_acc"] == ev["test_acc"]
    assert rows[1]["test_loss"] == ev["test_loss"], (rows[1]["test_loss"], ev["test_loss"])
    # evaluate_formats leaves the model it was given unchanged
    assert train.evaluate(model, data, norm, 1000) == {k: rows[0][k] for k in ev}


def test_cli_and_errors(trained, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("ptq_entry", root / "ptq_eval.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)

    out = tmp_path / "p.json"
    with pytest.raises(SystemExit) as e:
        cli.run_main(entry.main, ["tiny", "--runs-dir", str(trained.parent),
                                  "--formats", "e4m3,fp32", "--scalings", "scaled",
                                  "--device", "cpu", "--out", str(out)])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "fp32 (reference)" in text and "e4m3" in text and f"wrote {out}" in text
    res = json.loads(out.read_text())
    assert [(r["format"], r["scaling"]) for r in res["results"]] == [("fp32", "none"),
                                                                    ("e4m3", "scaled")]

    for argv, needle in ([["nope", "--runs-dir", str(tmp_path)], "no weights found"],
                         [[str(trained), "--formats", "e4m9x"], "--formats 'e4m9x'"],
                         [[str(trained), "--formats", "fp32"],
                          "at least one format other than fp32"],
                         [[str(trained), "--scalings", "channel"], "--scalings 'channel'"],
                         [[str(trained), str(trained), "--out", str(out)], "--out takes a single"]):
        with pytest.raises(SystemExit) as e:
            cli.run_main(entry.main, argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


@pytest.mark.slow
def test_block_formats_get_one_unscaled_row(trained):
    """mxfp8/mxfp6/mxfp4/nvfp4 are default rows; each gets one row, scaling none (its own block
    scales), with its bits per element, whatever the scaling modes asked for; asking for a block
    format scaled is refused."""
    assert {"mxfp8", "mxfp6", "mxfp4", "nvfp4"} <= set(ptq.DEFAULT_FORMATS)
    ckpt = runs.load_checkpoint(trained / "last.pt")
    config = cli.RunConfig.from_dict(ckpt["config"])
    dev = torch.device("cpu")
    model = ptq.load_model(config, ckpt["model"], dev, channels_last=True)
    data = data_mod.load_device_data(dev, None, synthetic=True)
    norm = data_mod.Normalizer(dev, channels_last=True)
    rows = ptq.evaluate_formats(model, data, norm, 256, ["mxfp4", "nvfp4", "e2m1"],
                                ["none", "scaled"])
    got = [(r["format"], r["scaling"], r["bits"]) for r in rows[1:]]
    assert got == [("mxfp4", "none", 4.25), ("nvfp4", "none", 4.5), ("e2m1", "none", 4),
                   ("e2m1", "scaled", 4)]
    fp32 = rows[0]
    for r in rows[1:]:
        assert math.isfinite(r["test_loss"]) and r["test_loss"] != fp32["test_loss"]
    for r in rows[1:3]:
        assert r["weight_scaling"] == r["act_scaling"] == "none"
    assert rows[1]["test_loss"] != rows[2]["test_loss"]      # two block formats, two casts
    with pytest.raises(cli.UserError, match="block format"):
        ptq.ptq_qconfig("mxfp4", "scaled")


def test_other_cast_settings_get_their_own_file_and_report_table(trained, tmp_path):
    """A --first-last-fp32 evaluation goes to ptq_first-last-fp32.json beside ptq.json instead of
    overwriting it, and the report shows one table per setting."""
    from common import report

    ptq.run_ptq(trained / "last.pt", formats=["e4m3"], scalings=["none"], device="cpu",
                eval_batch_size=256)
    ptq.run_ptq(trained / "last.pt", formats=["e4m3"], scalings=["none"], device="cpu",
                eval_batch_size=256, first_last_fp32=True)
    both = json.loads((trained / "ptq_first-last-fp32.json").read_text())
    assert both["first_last_fp32"] is True
    assert json.loads((trained / "ptq.json").read_text())["first_last_fp32"] is False
    assert ptq.ptq_file_name("tensor", True) == "ptq_wtensor_first-last-fp32.json"
    report.make_report(trained.parent, tmp_path / "out", plots=False)
    text = (tmp_path / "out" / "results.md").read_text()
    assert text.count("### Post-training quantization of FP32") == 2
    assert "except the first and last" in text
