"""The schema of RunConfig.format (common.config.FormatRecord): it reproduces the stored records
exactly, reads older ones, and the format scripts write their records through it."""
import importlib.util

import pytest

from common import cli
from common.config import FormatRecord

ROLE = {"fmt": "fp32", "rounding": "nearest", "scaling": "none"}
# Copied from results/runs-test1k/*/summary.json ("format").
STORED = {
    "fp32": {"family": "fp32", "bits_per_element": 32},
    "bf16": {"family": "bf16", "mode": "autocast", "bits_per_element": 16},
    "fp8-e4m3w": {"family": "fp8", "bits_per_element": 8,
                  "weight": {"fmt": "e4m3", "rounding": "nearest", "scaling": "tensor"},
                  "act": {"fmt": "e4m3", "rounding": "nearest", "scaling": "none"},
                  "grad": {"fmt": "e5m2", "rounding": "nearest", "scaling": "tensor"},
                  "weight_grad": ROLE, "master": ROLE, "first_last_fp32": True,
                  "backend": "native"},
    "fp4-mx": {"family": "fp4", "bits_per_element": 4.25,
               "weight": {"fmt": "mxfp4", "rounding": "nearest", "scaling": "none"},
               "act": {"fmt": "mxfp4", "rounding": "nearest", "scaling": "none"},
               "grad": {"fmt": "mxfp4", "rounding": "stochastic", "scaling": "none"},
               "weight_grad": ROLE, "master": ROLE, "first_last_fp32": False,
               "backend": "native"},
    "posit4": {"family": "posit4es0", "bits_per_element": 4,
               "weight": {"fmt": "posit4es0", "rounding": "nearest", "scaling": "channel"},
               "act": {"fmt": "posit4es0", "rounding": "nearest", "scaling": "tensor"},
               "grad": {"fmt": "posit4es0", "rounding": "nearest", "scaling": "tensor"},
               "weight_grad": ROLE, "master": ROLE, "first_last_fp32": True,
               "backend": "native"},
}


@pytest.mark.parametrize("key", list(STORED))
def test_stored_records_round_trip_exactly(key):
    d = STORED[key]
    record = FormatRecord.from_dict(d)
    assert record.to_dict() == d and list(record.to_dict()) == list(d)   # keys in stored order
    assert record.bits_per_element == d["bits_per_element"]


def test_fields_and_older_records():
    fp8 = FormatRecord.from_dict(STORED["fp8-e4m3w"])
    assert (fp8.family, fp8.role_fmt("weight"), fp8.role_fmt("grad")) == ("fp8", "e4m3", "e5m2")
    assert fp8.first_last_fp32 is True and fp8.backend == "native" and fp8.mode is None
    bf16 = FormatRecord.from_dict(STORED["bf16"])
    assert bf16.mode == "autocast" and bf16.roles is None and bf16.role_fmt("weight") is None
    assert FormatRecord.from_dict({"name": "fp32", "bits_per_element": 32}) == \
        FormatRecord.from_dict(STORED["fp32"])                  # the FP32 script's first records
    assert FormatRecord.from_dict(None) == FormatRecord(family="")
    assert FormatRecord.from_dict({"family": "fp8"}).bits_per_element is None


def _plan(script, argv):
    spec = importlib.util.spec_from_file_location(f"_schema_{script.split('/')[0]}",
                                                  cli.REPO_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.plan([*argv, "--synthetic"])["config"].format


def test_the_scripts_write_the_stored_records():
    """The three writers (FP32, BF16 autocast, qat_cli.plan_quantized for the quantized
    scripts) still produce the records already stored, so resumed runs compare equal."""
    from common import sweep

    assert _plan("FP32/train_cifar10_fp32.py", []) == STORED["fp32"]
    assert _plan("BF16/bf16_train.py", ["--mode", "autocast"]) == STORED["bf16"]
    for key in ("fp8-e4m3w", "fp4-mx", "posit4"):
        cfg = sweep.CONFIGS[key]
        assert _plan(cfg.script, list(cfg.flags)) == STORED[key]
