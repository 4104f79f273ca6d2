"""The four format scripts: a few steps on synthetic data end with the accuracy line; bad flags
exit 2 with one clear line and no traceback; each run records what it trained."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from common import runs, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--synthetic", "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "32",
         "--model", "resnet8"]


def _run(folder, script, *args, tmp_path, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    path = os.path.join(ROOT, folder, script)
    return subprocess.run([sys.executable, path, *args, "--runs-dir", str(tmp_path)],
                          cwd=cwd or os.path.join(ROOT, folder), env=env, capture_output=True,
                          text=True, timeout=600)


SCRIPTS = [
    ("BF16", "bf16_train.py", ["--mode", "autocast"], "bf16_autocast_resnet8_paper_e1_s0", None),
    ("BF16", "bf16_train.py", ["--mode", "emulated"],
     "bf16_w-bf16_a-bf16_g-bf16_resnet8_paper_e1_s0",
     {"weight": "bf16", "act": "bf16", "grad": "bf16"}),
    ("FP8", "train_cifar10_fp8.py", ["--w-fmt", "e5m2", "--a-fmt", "e4m3", "--first-last-fp32"],
     "fp8_w-e5m2-t_a-e4m3_g-e5m2-t_fl32_resnet8_paper_e1_s0",
     {"weight": "e5m2", "act": "e4m3", "grad": "e5m2"}),
    ("FP8", "train_cifar10_fp8.py", ["--backend", "qtorch"],
     "fp8_w-e4m3-t_a-e4m3_g-e5m2-t_qtorch_resnet8_paper_e1_s0",
     {"weight": "e4m3", "act": "e4m3", "grad": "e5m2"}),
    ("FP4", "train_cifar10_fp4.py", [], "fp4_w-e2m1-c_a-e2m1-t_g-e2m1-sr-t_resnet8_paper_e1_s0",
     {"weight": "e2m1", "act": "e2m1", "grad": "e2m1"}),
    ("Posit", "train_cifar10_posit.py", ["--bits", "4", "--es", "0", "--first-last-fp32"],
     "posit4es0_w-posit4es0-c_a-posit4es0-t_g-posit4es0-t_fl32_resnet8_paper_e1_s0",
     {"weight": "posit4es0", "act": "posit4es0", "grad": "posit4es0"}),
]


@pytest.mark.slow
@pytest.mark.parametrize("folder,script,args,name,roles", SCRIPTS,
                         ids=[f"{s[0]}{'-' + s[2][1] if s[2] else ''}" for s in SCRIPTS])
def test_script_runs_a_few_steps_and_prints_accuracy(folder, script, args, name, roles, tmp_path):
    r = _run(folder, script, *args, *SMOKE, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "final test accuracy:" in r.stdout.strip().splitlines()[-1]
    run_dir = tmp_path / (name + "_synthetic_max2")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    if roles is not None:
        for role, fmt in roles.items():
            assert summary["format"][role]["fmt"] == fmt
    else:
        assert summary["autocast"]


@pytest.mark.slow
def test_script_runs_from_repo_root(tmp_path):
    r = _run("Posit", "train_cifar10_posit.py", "--bits", "16", "--es", "1", *SMOKE,
             tmp_path=tmp_path, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / ("posit16es1_w-posit16es1_a-posit16es1_g-posit16es1_"
                        "resnet8_paper_e1_s0_synthetic_max2") / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("folder,script,args,needle", [
    ("FP8", "train_cifar10_fp8.py", ["--w-fmt", "e4m9"], "at most 8 bits"),   # 14 bits: a typo
    ("FP8", "train_cifar10_fp8.py", ["--w-fmt", "e4m9x"], "accepted"),
    ("FP8", "train_cifar10_fp8.py", ["--g-fmt", "posit40es2"], "accepted"),
    ("FP8", "train_cifar10_fp8.py", ["--a-scaling", "channel"], "invalid choice"),
    ("Posit", "train_cifar10_posit.py", ["--bits", "40"], "accepted"),
    ("Posit", "train_cifar10_posit.py", ["--bits", "16", "--es", "4"], "accepted"),
    ("FP4", "train_cifar10_fp4.py", ["--w-rounding", "up"], "invalid choice"),
    ("BF16", "bf16_train.py", ["--w-fmt", "e4m3"], "--mode emulated"),
    ("BF16", "bf16_train.py", ["--mode", "fast"], "invalid choice"),
    # autocast makes no casts: a rounding or scaling flag is not silently dropped
    ("BF16", "bf16_train.py", ["--mode", "autocast", "--g-rounding", "stochastic"],
     "--g-rounding: the quantization flags need --mode emulated"),
    ("BF16", "bf16_train.py", ["--mode", "autocast", "--w-scaling", "tensor"],
     "--w-scaling: the quantization flags need --mode emulated"),
    ("BF16", "bf16_train.py", ["--g-rounding", "stochastic"], "need --mode emulated"),
    # a block format carries its own scales: an explicit other scaling is refused
    ("FP8", "train_cifar10_fp8.py", ["--w-fmt", "mxfp8", "--w-scaling", "tensor"],
     "--w-scaling tensor: --w-fmt mxfp8 is a block format"),
    ("FP4", "train_cifar10_fp4.py", ["--g-scaling", "tensor", "--g-fmt", "nvfp4"],
     "accepted with a block format: --g-scaling none"),
    ("Posit", "train_cifar10_posit.py", ["--a-fmt", "mxfp8", "--a-scaling", "tensor"],
     "--a-fmt mxfp8 is a block format"),
    ("FP4", "train_cifar10_fp4.py", ["--w-fmt", "mxfp8"], "at most 4 bits"),
])
def test_bad_flags_exit_2_with_one_clear_line(folder, script, args, needle, tmp_path):
    r = _run(folder, script, *args, tmp_path=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert needle in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_help_states_every_default():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "FP4", "train_cifar10_fp4.py"),
                        "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert "FP4 cannot train unscaled" in " ".join(r.stdout.split())
    for flag in ("--w-fmt", "--g-scaling", "--first-last-fp32", "--backend", "--epochs", "--model"):
        assert flag in r.stdout
    assert r.stdout.count("(default:") >= 30


@pytest.mark.slow
def test_bf16_default_is_emulated_where_bf16_convolutions_are_slow(tmp_path):
    """On a CPU without bf16 hardware (simulated: oneDNN limited to AVX2) the BF16 script's
    default run is emulated, not autocast, and one line says why; --mode autocast still forces
    autocast there."""
    env_isa = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    os.environ.update(env_isa)
    try:
        r = _run("BF16", "bf16_train.py", *SMOKE, tmp_path=tmp_path)
        forced = _run("BF16", "bf16_train.py", "--mode", "autocast", *SMOKE, tmp_path=tmp_path)
    finally:
        for k in env_isa:
            os.environ.pop(k)
    assert r.returncode == 0, r.stderr[-2000:]
    why = [line for line in r.stdout.splitlines() if line.startswith("bf16:")]
    assert len(why) == 1 and "--mode emulated" in why[0] and "slower than float32" in why[0]
    summary = json.loads(next(tmp_path.glob("bf16_w-bf16_a-bf16_g-bf16_*/summary.json"))
                         .read_text())
    assert summary["label"].startswith("BF16 emulated") and not summary["autocast"]
    assert forced.returncode == 0
    assert not any(line.startswith("bf16:") for line in forced.stdout.splitlines())
    assert list(tmp_path.glob("bf16_autocast_*/summary.json"))


@pytest.mark.parametrize("mode", ["autocast", "emulated"])
@pytest.mark.parametrize("named", [True, False])
def test_bf16_resume_keeps_the_mode_the_run_started_in(mode, named, tmp_path, monkeypatch, capsys):
    """On another CPU the probe may choose the other mode; a --resume (by --name, as the sweep
    runs, or by the default name) continues the run in the mode its config.json records,
    without probing."""
    bf16 = load_script("BF16", "bf16_train.py")
    first = ["--model", "resnet8", "--epochs", "2", "--runs-dir", str(tmp_path),
             "--mode", mode] + (["--name", "b"] if named else [])
    config = bf16.plan(first)["config"]
    runs.write_json(config.run_dir / runs.CONFIG, {"config": config.to_dict()})
    monkeypatch.setattr(bf16.hardware, "bf16_autocast_speed",
                        lambda device: pytest.fail("probed on resume"))
    capsys.readouterr()
    again = bf16.plan([a for a in first if a not in ("--mode", mode)] + ["--resume"])
    assert again["config"].name == config.name and again["config"].format == config.format
    assert f"bf16: --mode {mode}, as the run was started" in capsys.readouterr().out


@pytest.mark.parametrize("argv,tags", [
    ([], ("w-posit8es1", "a-posit8es1", "g-posit8es1-t")),               # the seed's, unchanged
    (["--bits", "4", "--es", "0"], ("w-posit4es0-c", "a-posit4es0-t", "g-posit4es0-t")),
    (["--bits", "8", "--w-fmt", "posit4es0"], ("w-posit4es0-c", "a-posit8es1", "g-posit8es1-t")),
    (["--bits", "16", "--g-fmt", "posit8es1"], ("w-posit16es1", "a-posit16es1", "g-posit8es1-t")),
    (["--bits", "4", "--es", "0", "--w-fmt", "posit16es1"],
     ("w-posit16es1", "a-posit4es0-t", "g-posit4es0-t")),
])
def test_posit_auto_scaling_follows_each_roles_own_width(argv, tags):
    """--scaling auto scales a role by its own format's width: a posit4 weight under --bits 8 is
    scaled per channel (posit(<=5 bits) cannot train unscaled), a posit16 one under --bits 4 not."""
    name = load_script("Posit", "train_cifar10_posit.py").plan(argv)["config"].name
    assert all(f"_{tag}_" in name for tag in tags), name


def load_script(folder, script):
    spec = importlib.util.spec_from_file_location(f"{folder}_script",
                                                  os.path.join(ROOT, folder, script))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("folder,script,args,name", [
    ("FP32", "train_cifar10_fp32.py", [], "fp32_resnet20_paper_e164_s0"),
    ("FP32", "train_cifar10_fp32.py", ["--epochs", "3"], "fp32_resnet20_paper_e3_s0"),
    ("BF16", "bf16_train.py", ["--recipe", "fast", "--seed", "2", "--mode", "autocast"],
     "bf16_autocast_resnet20_fast_e20_s2"),
    ("FP8", "train_cifar10_fp8.py", ["--w-fmt", "e5m2", "--a-fmt", "e4m3", "--first-last-fp32",
                                     "--recipe", "fast"],
     "fp8_w-e5m2-t_a-e4m3_g-e5m2-t_fl32_resnet20_fast_e20_s0"),
    ("FP4", "train_cifar10_fp4.py", ["--model", "resnet8", "--epochs", "2"],
     "fp4_w-e2m1-c_a-e2m1-t_g-e2m1-sr-t_resnet8_paper_e2_s0"),
    ("Posit", "train_cifar10_posit.py", ["--bits", "16"],
     "posit16es1_w-posit16es1_a-posit16es1_g-posit16es1_resnet20_paper_e164_s0"),
])
def test_default_run_names_carry_recipe_and_epochs(folder, script, args, name):
    """Script run names follow the sweep's pattern after the format tag, so a 3-epoch run never
    lands in (and is refused by) the folder of a finished 164-epoch one."""
    config = load_script(folder, script).plan(args)["config"]
    assert config.name == name
    assert name.endswith(sweep.run_name("", config.model, config.epochs, config.seed,
                                        recipe=config.recipe))


@pytest.mark.slow
def test_fp8_help_lists_only_formats_it_accepts(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        load_script("FP8", "train_cifar10_fp8.py").plan(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    entries = {m.group(1): " ".join(m.group(2).split())        # each option's help, by flag
               for m in re.finditer(r"^  (--[\w-]+)(.*?)(?=^  \S|\Z)", out, re.M | re.S)}
    w_help = entries["--w-fmt"]
    assert "e4m3" in w_help and "e5m2" in w_help and "posit<n>es<k> with n <= 8" in w_help
    assert "bf16" not in w_help and "fp16" not in w_help
    assert "bf16" in entries["--wg-fmt"]      # --wg-fmt takes any format
    for fmt in ("bf16", "fp16"):              # what the help leaves out is really refused
        r = _run("FP8", "train_cifar10_fp8.py", "--w-fmt", fmt, tmp_path=tmp_path)
        assert r.returncode == 2 and "at most 8 bits" in r.stderr.strip().splitlines()[-1]


SHARED_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "cifar10"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="no ../shared/cifar10 beside the repo")
def test_readme_relative_data_path_works_from_a_format_folder(tmp_path):
    """`cd FP32 && CIFAR10_DIR=../shared/cifar10 python train_cifar10_fp32.py`: the README's path,
    written from the repo root, is found from the format folder too, and no folder is made."""
    in_repo = os.path.join(ROOT, "shared")          # what FP32/../shared/cifar10 means from FP32/
    existed = os.path.exists(in_repo)
    env = dict(os.environ, OMP_NUM_THREADS="1", CIFAR10_DIR=os.path.join("..", "shared", "cifar10"))
    r = subprocess.run([sys.executable, "train_cifar10_fp32.py", "--model", "resnet8",
                        "--epochs", "1", "--max-steps-per-epoch", "1", "--runs-dir", str(tmp_path)],
                       cwd=os.path.join(ROOT, "FP32"), env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "final test accuracy:" in r.stdout.strip().splitlines()[-1]
    assert os.path.exists(in_repo) == existed       # looking for data made no folder


# script, flags, run name, (w, a, g) formats, (w, a, g) scalings, bits per element
BLOCK_PLANS = [
    ("FP8", "train_cifar10_fp8.py", ["--w-fmt", "mxfp8", "--a-fmt", "mxfp8", "--g-fmt", "mx-e5m2"],
     "fp8_w-mxfp8_a-mxfp8_g-mx-e5m2", ("mxfp8", "mxfp8", "mx-e5m2"), ("none",) * 3, 8.25),
    ("FP8", "train_cifar10_fp8.py", ["--w-fmt", "mxfp8"],     # a, g keep their default scalings
     "fp8_w-mxfp8_a-e4m3_g-e5m2-t", ("mxfp8", "e4m3", "e5m2"), ("none", "none", "tensor"), 8.25),
    ("FP4", "train_cifar10_fp4.py", ["--w-fmt", "mxfp4", "--a-fmt", "mxfp4", "--g-fmt", "mxfp4"],
     "fp4_w-mxfp4_a-mxfp4_g-mxfp4-sr", ("mxfp4",) * 3, ("none",) * 3, 4.25),
    ("FP4", "train_cifar10_fp4.py", ["--w-fmt", "nvfp4", "--a-fmt", "nvfp4", "--g-fmt", "nvfp4",
                                     "--w-scaling", "none"],
     "fp4_w-nvfp4_a-nvfp4_g-nvfp4-sr", ("nvfp4",) * 3, ("none",) * 3, 4.5),
    ("FP4", "train_cifar10_fp4.py", ["--a-fmt", "nvfp4"],
     "fp4_w-e2m1-c_a-nvfp4_g-e2m1-sr-t", ("e2m1", "nvfp4", "e2m1"), ("channel", "none", "tensor"),
     4.5),
    ("Posit", "train_cifar10_posit.py", ["--bits", "4", "--es", "0", "--g-fmt", "mxfp8"],
     "posit4es0_w-posit4es0-c_a-posit4es0-t_g-mxfp8", ("posit4es0", "posit4es0", "mxfp8"),
     ("channel", "tensor", "none"), 4),
]


@pytest.mark.parametrize("folder,script,args,tag,fmts,scalings,bits", BLOCK_PLANS,
                         ids=[f"{p[0]}-{p[3]}" for p in BLOCK_PLANS])
def test_plan_with_block_formats(folder, script, args, tag, fmts, scalings, bits):
    """Each script takes block formats of its width in every role; a role with a block format
    is cast with scaling none, where the script's default (or --scaling auto) would scale it;
    the name, the label and the bits per element (block scales included) record it."""
    config = load_script(folder, script).plan(args)["config"]
    assert config.name == f"{tag}_resnet20_paper_e164_s0"
    f = config.format
    assert tuple(f[r]["fmt"] for r in ("weight", "act", "grad")) == fmts
    assert tuple(f[r]["scaling"] for r in ("weight", "act", "grad")) == scalings
    assert f["bits_per_element"] == bits
    for role, fmt in zip("wag", fmts):
        assert f"{role}={fmt}" in config.label


def test_block_format_scaling_refused_in_plan_with_one_line():
    from common.errors import UserError

    with pytest.raises(UserError) as e:
        load_script("FP4", "train_cifar10_fp4.py").plan(["--w-fmt", "mxfp4", "--w-scaling",
                                                         "channel"])
    msg = str(e.value)
    assert "\n" not in msg and "--w-scaling channel" in msg and "--w-scaling none" in msg


def test_fp4_help_documents_the_three_configurations(capsys):
    """--help's epilogue names the sweep's three FP4 configurations with their exact flags."""
    with pytest.raises(SystemExit):
        load_script("FP4", "train_cifar10_fp4.py").plan(["--help"])
    out = capsys.readouterr().out
    epilog = out[out.index("Three configurations"):]
    for key in ("fp4", "fp4-mx", "fp4-nv"):
        assert f"\n    {key} " in epilog
    doc = load_script("FP4", "train_cifar10_fp4.py").__doc__
    for key in ("fp4-mx", "fp4-nv"):
        command = next(line for line in doc.splitlines() if line.rstrip().endswith(f"# {key}"))
        assert " ".join(sweep.CONFIGS[key].flags) in command
    assert "none for a block format" in " ".join(out.split())


@pytest.mark.slow
@pytest.mark.parametrize("key", ["fp4-mx", "fp4-nv"])
def test_one_training_step_with_block_formats(key):
    """The sweep's MXFP4 / NVFP4 configurations, built by the FP4 script: one SGD step on
    synthetic data in channels-last (as training runs) gives a finite loss and finite
    gradients and changes every quantized layer's weights."""
    import torch
    import torch.nn.functional as F

    from common.qat import quantized_layers
    from common.resnet import resnet8

    plan = load_script("FP4", "train_cifar10_fp4.py").plan(
        [*sweep.CONFIGS[key].flags, "--model", "resnet8"])
    torch.manual_seed(0)
    model = plan["model_transform"](resnet8().to(memory_format=torch.channels_last))
    layers = quantized_layers(model)
    fmt = sweep.CONFIGS[key].flags[1]
    assert layers and all(m.qconfig.weight.fmt.name == fmt for _, m in layers)
    before = [m.weight.detach().clone() for _, m in layers]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert all(not torch.equal(b, m.weight) for b, (_, m) in zip(before, layers))
