"""The typed scaling description (common/scaling.py), the three named steps of a scaled cast
(statistic, exponent, cast) and the role table (common/qat.ROLES) that flags, run names, labels
and checks derive from."""
import argparse
import math

import pytest
import torch

from common import qat_cli
from common.formats import parse_format
from common.qat import ROLES, QuantConfig, RoleQuant
from common.quant import (
    _cast_with_scale,
    _scale_exponent,
    _scale_statistic,
    quantize,
    quantize_scaled,
)
from common.scaling import (
    AMAX_TO_MAX,
    BLOCK_AXIS,
    MX_BLOCK,
    NVFP4_BLOCK,
    RMS_TO_ONE,
    SCALINGS,
    Scaling,
)


@pytest.mark.parametrize("spec,scaling,want", [
    ("e4m3", "tensor", Scaling("tensor", None, AMAX_TO_MAX)),
    ("bf16", "channel", Scaling("channel", 0, AMAX_TO_MAX)),
    ("posit8es1", "tensor", Scaling("tensor", None, RMS_TO_ONE)),
    ("posit4es0", "channel", Scaling("channel", 0, RMS_TO_ONE)),
    ("e2m1", "none", Scaling("none", None, None)),
    ("fp32", "tensor", Scaling("none", None, None)),          # fp32 casts nothing
    ("mxfp4", "none", Scaling("block", BLOCK_AXIS, MX_BLOCK)),
    ("mxfp8", "none", Scaling("block", BLOCK_AXIS, MX_BLOCK)),
    ("nvfp4", "none", Scaling("block", BLOCK_AXIS, NVFP4_BLOCK)),
])
def test_strings_resolve_to_granularity_axis_and_rule(spec, scaling, want):
    got = Scaling.parse(scaling).for_format(parse_format(spec))
    assert got == want
    assert got.flag == ("none" if spec in ("fp32", "mxfp4", "mxfp8", "nvfp4") else scaling)


def test_channel_axis_and_string_forms():
    assert Scaling.parse("channel", channel_dim=1).axis == 1
    assert Scaling("channel").axis == 0 and Scaling("block").axis == BLOCK_AXIS
    assert [Scaling.parse(s).tag for s in SCALINGS] == ["", "t", "c"]
    assert str(Scaling.parse("tensor")) == "tensor"
    assert Scaling.parse(Scaling("tensor")) == Scaling("tensor")
    scalings = (Scaling(), Scaling("tensor"), Scaling("channel"), Scaling("block"))
    assert [s.rescales for s in scalings] == [False, True, True, False]


@pytest.mark.parametrize("make,needle", [
    (lambda: Scaling.parse("row"), "accepted: none, tensor, channel"),
    (lambda: Scaling.parse(None), "accepted: none, tensor, channel"),
    (lambda: Scaling("blocks"), "accepted: none, tensor, channel"),
    (lambda: Scaling("tensor").for_format(parse_format("mxfp4")), "carries its own scaling"),
    (lambda: Scaling("channel").for_format(parse_format("nvfp4")), "accepted: scaling='none'"),
    (lambda: Scaling("block").for_format(parse_format("e4m3")), "only a block format"),
    (lambda: RoleQuant("mxfp4", scaling="tensor"), "carries its own scaling"),
])
def test_bad_scalings_are_one_line_value_errors(make, needle):
    with pytest.raises(ValueError) as e:
        make()
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["e4m3", "e2m1", "posit8es1", "posit4es0", "bf16"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_typed_and_string_scaling_give_the_same_bits(spec, granularity):
    torch.manual_seed(0)
    x = torch.randn(8, 5, 3, 3) * 0.03
    a = quantize_scaled(x, spec, scaling=granularity)
    b = quantize_scaled(x, spec, scaling=Scaling.parse(granularity))
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_three_steps_follow_the_rules():
    """Step 1 reads amax (floats) or rms (posits) per scale; step 2 puts amax*2^k in
    (max/2, max] or rms*2^k within a factor sqrt(2) of 1; step 3 is cast(x*2^k)/2^k."""
    torch.manual_seed(1)
    x = torch.randn(6, 40) * torch.logspace(-3, 2, 6).unsqueeze(1)
    e4m3 = parse_format("e4m3")
    plan = Scaling("channel").for_format(e4m3)
    amax = _scale_statistic(x, plan)
    assert torch.equal(amax.flatten(), x.abs().amax(dim=1))
    k = _scale_exponent(amax, e4m3, plan).flatten()
    for a, kk in zip(amax.flatten().tolist(), k.tolist()):
        assert e4m3.max / 2 < a * 2.0 ** kk <= e4m3.max
    y = _cast_with_scale(x, e4m3, k.view(6, 1), plan, "nearest", True, None, quantize)
    s = torch.exp2(k.float()).view(6, 1)
    assert torch.equal(y, quantize(x * s, "e4m3") / s)

    posit = parse_format("posit8es1")
    plan = Scaling("tensor").for_format(posit)
    rms = float(_scale_statistic(x, plan))
    assert rms == pytest.approx(math.sqrt(float((x.double() ** 2).mean())), rel=1e-6)
    k = int(_scale_exponent(torch.tensor(rms), posit, plan))
    assert 2 ** -0.5 <= rms * 2.0 ** k <= 2 ** 0.5


def _quant_group_options(parser):
    group = next(g for g in parser._action_groups if g.title == "quantization")
    return {a.option_strings[0]: a for a in group._group_actions}


def test_flags_names_labels_and_checks_come_from_the_role_table():
    """Every role of ROLES has its format and rounding flags, a scaling flag exactly when it
    accepts more than none (with those choices), a field in QuantConfig, and is named in run
    names and labels by its table entries."""
    parser = argparse.ArgumentParser()
    qat_cli.add_quant_args(parser, {})
    options = _quant_group_options(parser)
    for role in ROLES:
        assert f"--{role.key}-fmt" in options and f"--{role.key}-rounding" in options
        scaling = options.get(f"--{role.key}-scaling")
        assert (scaling is not None) == (role.scalings != ("none",))
        if scaling is not None:
            assert tuple(scaling.choices) == role.scalings
    assert list(QuantConfig().to_dict())[:len(ROLES)] == [r.field for r in ROLES]

    every = {r.field: RoleQuant("e4m3", "stochastic",
                                "tensor" if "tensor" in r.scalings else "none")
             for r in ROLES}
    q = QuantConfig(**every)
    tag, label = qat_cli.run_tag(q), qat_cli.describe(q)
    for role in ROLES:
        short = "e4m3-sr" + ("-t" if "tensor" in role.scalings else "")
        assert f"{role.name_tag}-{short}" in tag.split("_")
        assert f"{role.key}=e4m3(sr)" in label
    plain = QuantConfig(weight=RoleQuant("e4m3"))
    assert qat_cli.run_tag(plain).split("_") == [
        f"{r.name_tag}-{'e4m3' if r.field == 'weight' else 'fp32'}"
        for r in ROLES if r.always_named]
    for role in ROLES:
        for granularity in set(SCALINGS) - set(role.scalings):
            with pytest.raises(ValueError, match=f"accepted for {role.field}: "):
                QuantConfig(**{role.field: RoleQuant("e4m3", scaling=granularity)})
