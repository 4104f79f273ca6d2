"""ResNet family: parameter counts against the paper and torchvision, shapes, shortcut options."""
import pytest
import torch
import torch.nn as nn

from common import resnet
from common.resnet import build_model, count_parameters

# He et al. 2016, Table 6 (CIFAR-10): parameters as printed in the paper, with the paper's rounding.
PAPER_PARAMS_M = {"resnet20": (0.27, 2), "resnet32": (0.46, 2), "resnet44": (0.66, 2),
                  "resnet56": (0.85, 2), "resnet110": (1.7, 1)}


def cifar_param_formula(depth, classes=10):
    """Independent count for option A: convolutions + BN (scale, shift) + the Linear layer."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16                                   # stem conv + BN
    c_in = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += c_in * width * 9 + width * width * 9 + 4 * width  # two convs, two BNs
            c_in = width
    return total + 64 * classes + classes


@pytest.mark.parametrize("name", list(PAPER_PARAMS_M))
def test_cifar_param_counts_match_paper(name):
    model = build_model(name)
    count = count_parameters(model)
    expected, digits = PAPER_PARAMS_M[name]
    assert round(count / 1e6, digits) == expected
    assert count == cifar_param_formula(int(name[6:]))


@pytest.mark.parametrize("name", list(PAPER_PARAMS_M) + ["resnet8"])
def test_cifar_depth_is_6n_plus_2(name):
    """Weighted layers on the main path (convolutions outside shortcuts + the Linear) = depth."""
    model = build_model(name, shortcut="B")
    layers = [m for mod_name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and "shortcut" not in mod_name]
    assert len(layers) == int(name[6:])


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_imagenet_depth_models_match_torchvision_with_cifar_stem(name):
    """Same parameter shapes as torchvision's ResNet once its stem is made 3x3/stride 1/no pool."""
    try:        # a torchvision build that does not match torch raises RuntimeError, not ImportError
        import torchvision.models as tv_models
    except Exception as e:
        pytest.skip(f"torchvision does not import here ({type(e).__name__}: {e})")
    tv = getattr(tv_models, name)(num_classes=10)
    tv.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    tv.maxpool = nn.Identity()
    ours = build_model(name)
    assert count_parameters(ours) == count_parameters(tv)
    assert sorted(p.shape for p in ours.parameters()) == sorted(p.shape for p in tv.parameters())


@pytest.mark.parametrize("name,shortcut", [("resnet20", "A"), ("resnet20", "B"),
                                           ("resnet18", None), ("resnet50", None)])
def test_forward_shapes(name, shortcut):
    model = build_model(name, num_classes=7, shortcut=shortcut).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.fc, nn.Linear)


def test_option_a_is_parameter_free_zero_padding_identity():
    a, b = build_model("resnet20", shortcut="A"), build_model("resnet20", shortcut="B")
    assert count_parameters(b) - count_parameters(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    block = a.stages[1][0]                                 # first block of stage 2: 16 -> 32, /2
    assert isinstance(block.shortcut, resnet.PadShortcut)
    x = torch.randn(2, 16, 8, 8)
    y = block.shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    sub = x[:, :, ::2, ::2]
    assert torch.equal(y[:, 8:24], sub)                    # identity on every other pixel
    assert not y[:, :8].any() and not y[:, 24:].any()      # zeros in the new channels
    proj = b.stages[1][0].shortcut
    assert isinstance(proj[0], nn.Conv2d)
    assert proj[0].kernel_size == (1, 1) and proj[0].stride == (2, 2)


def test_default_shortcuts_per_family():
    assert build_model("resnet56").shortcut_option == "A"
    assert build_model("resnet18").shortcut_option == "B"


def test_he_init_std():
    """Convolutions start with std sqrt(2/fan_in) (He et al. 2015), BN at scale 1, shift 0."""
    torch.manual_seed(0)
    model = build_model("resnet110")
    w = torch.cat([m.weight.flatten() / (2.0 / (m.weight[0].numel())) ** 0.5
                   for m in model.modules() if isinstance(m, nn.Conv2d)])
    assert abs(w.std().item() - 1.0) < 0.01
    bn = model.bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()


def test_unknown_model_and_bad_depth():
    with pytest.raises(ValueError, match="resnet20"):
        build_model("resnet21")
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet.CifarResNet(21)
    with pytest.raises(ValueError, match="shortcut"):
        build_model("resnet20", shortcut="C")
