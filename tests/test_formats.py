"""common/formats.py: spec strings to Format, checked against ml_dtypes, torch.finfo, softposit."""
import dataclasses

import numpy as np
import pytest
import torch

from common.formats import Format, parse_format

ml_dtypes = pytest.importorskip("ml_dtypes")

# spec -> independent numpy dtype whose finfo gives bits, max, smallest normal and subnormal
ML_DTYPES = {
    "bf16": ml_dtypes.bfloat16,
    "fp16": np.float16,
    "e4m3": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
    "e2m1": ml_dtypes.float4_e2m1fn,
    "e2m3": ml_dtypes.float6_e2m3fn,
    "e3m2": ml_dtypes.float6_e3m2fn,
    "e3m4": ml_dtypes.float8_e3m4,  # IEEE-like E3M4 (inf and NaN): our "other eXmY" rule
}


@pytest.mark.parametrize("spec", sorted(ML_DTYPES))
def test_float_fields_match_ml_dtypes(spec):
    fmt = parse_format(spec)
    fi = ml_dtypes.finfo(ML_DTYPES[spec])
    assert fmt.kind == "float"
    assert fmt.bits == fi.bits
    assert fmt.exp_bits == fi.nexp and fmt.man_bits == fi.nmant
    assert fmt.max == float(fi.max)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)


def test_special_values_per_layout():
    # docs/formats.md table: which formats have inf / NaN
    assert (parse_format("e4m3").has_inf, parse_format("e4m3").has_nan) == (False, True)
    assert (parse_format("e5m2").has_inf, parse_format("e5m2").has_nan) == (True, True)
    for spec in ("e2m1", "e2m3", "e3m2"):
        f = parse_format(spec)
        assert (f.has_inf, f.has_nan) == (False, False)
    assert parse_format("e3m4").has_inf and parse_format("posit8es1").has_nan


@pytest.mark.parametrize("spec,dtype,np_dtype", [("bf16", torch.bfloat16, ml_dtypes.bfloat16),
                                                  ("fp16", torch.float16, np.float16),
                                                  ("fp32", torch.float32, np.float32)])
def test_fields_match_torch_finfo(spec, dtype, np_dtype):
    fmt, fi = parse_format(spec), torch.finfo(dtype)
    assert fmt.bits == fi.bits and fmt.max == fi.max and fmt.min_normal == fi.smallest_normal
    assert fmt.min_subnormal == float(ml_dtypes.finfo(np_dtype).smallest_subnormal)


def test_other_exmy_is_ieee_like():
    # e6m9: bias 31, top exponent reserved, subnormals: max (2 - 2^-9) * 2^31
    f = parse_format("e6m9")
    assert (f.bits, f.bias, f.layout) == (16, 31, "ieee")
    assert f.max == (2 - 2**-9) * 2.0**31
    assert f.min_normal == 2.0**-30 and f.min_subnormal == 2.0**-39


@pytest.mark.parametrize("n,es", [(8, 0), (16, 1), (6, 2), (16, 2), (3, 2)])
def test_posit_fields_match_softposit(n, es):
    sp = pytest.importorskip("softposit")
    f = parse_format(f"posit{n}es{es}")
    assert (f.kind, f.bits, f.es, f.has_inf, f.has_nan) == ("posit", n, es, False, True)
    assert f.min_normal is None
    # softposit saturates huge/tiny inputs to maxpos/minpos
    if (n, es) == (8, 0):
        hi, lo = (sp.convertP8ToDouble(sp.convertDoubleToP8(v)) for v in (1e300, 1e-300))
    elif (n, es) == (16, 1):
        hi, lo = (sp.convertP16ToDouble(sp.convertDoubleToP16(v)) for v in (1e300, 1e-300))
    elif es == 2:
        hi, lo = (sp.convertPX2ToDouble(sp.convertDoubleToPX2(v, n)) for v in (1e300, 1e-300))
    else:
        hi, lo = 2.0 ** ((n - 2) * 2**es), 2.0 ** (-(n - 2) * 2**es)  # useed^(n-2)
    assert f.max == hi and f.min_subnormal == lo


@pytest.mark.parametrize("alias,canonical", [
    ("none", "fp32"), ("FP32", "fp32"), ("e8m23", "fp32"), ("fp4", "e2m1"), ("e8m7", "bf16"),
    ("e5m10", "fp16"), (" E4M3 ", "e4m3"), ("Posit8Es1", "posit8es1")])
def test_aliases_are_one_format(alias, canonical):
    assert parse_format(alias) == parse_format(canonical)
    assert parse_format(alias).name == canonical


def _all_specs():
    specs = ["fp32", "bf16", "fp16"]
    specs += [f"e{x}m{y}" for x in range(2, 9) for y in range(0, 24)]
    specs += [f"posit{n}es{es}" for n in range(2, 17) for es in range(0, 7)
              if (n - 2) * 2**es <= 126]
    return specs


def test_str_round_trips_for_every_accepted_spec():
    for spec in _all_specs():
        f = parse_format(spec)
        assert str(f) == f.name
        assert parse_format(str(f)) == f, spec
        assert parse_format(f) is f


def test_format_is_frozen_and_hashable():
    f = parse_format("e4m3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.max = 480.0
    assert {f: 1}[parse_format("e4m3")] == 1


def test_identity():
    assert parse_format("none").is_identity and parse_format("fp32").kind == "none"
    assert not parse_format("bf16").is_identity


@pytest.mark.parametrize("spec", [
    "e4m9x", "posit40es2", "e9m30", "e1m2", "e4m24", "e0m3", "posit1es0", "posit17es1",
    "posit16es4", "posit4es7", "posit8", "int8", "", "fp8", "e4m3 e5m2", "posit8es-1"])
def test_bad_spec_is_a_one_line_value_error_naming_accepted(spec):
    with pytest.raises(ValueError) as info:
        parse_format(spec)
    msg = str(info.value)
    assert "\n" not in msg and repr(spec) in msg
    assert "accepted" in msg and "posit<n>es<k>" in msg and "eXmY" in msg


def test_non_string_spec_is_a_type_error():
    with pytest.raises(TypeError):
        parse_format(8)
    assert isinstance(parse_format(parse_format("e5m2")), Format)
