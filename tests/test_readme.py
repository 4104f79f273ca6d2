"""What the README tells users to do holds: the CPU-only install and the quantize/fake_quant
note."""
import re
from pathlib import Path

import torch

from common.qat import RoleQuant, fake_quant
from common.quant import quantize

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def section(title: str) -> str:
    """The README text under a '## title' heading, up to the next '## ' heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_install_says_how_to_get_the_cpu_only_torch_build():
    install = section("Install and test")
    line = next((ln for ln in install.splitlines() if CPU_INDEX in ln), "")
    assert re.match(rf"pip install torch torchvision --index-url {re.escape(CPU_INDEX)}\b",
                    line), line
    assert "CUDA" in install and "GB" in install              # why: the default wheel's size
    assert install.index(CPU_INDEX) < install.rindex("pip install -r requirements-test.txt")


def test_quantize_is_detached_and_fake_quant_is_what_a_model_calls():
    """The README's note: quantize() cuts the graph; fake_quant passes gradients (cast by bwd)."""
    formats = section("Number formats")
    assert "detached" in formats and "common.qat.fake_quant" in formats
    x = torch.tensor([0.3, -1.7, 2.2], requires_grad=True)
    assert not quantize(x, "e4m3").requires_grad
    y = fake_quant(x, RoleQuant("e4m3"), RoleQuant("e5m2"))
    assert torch.equal(y.detach(), quantize(x.detach(), "e4m3"))
    y.backward(torch.tensor([1.0, 0.1, 1e-3]))
    assert torch.equal(x.grad, quantize(torch.tensor([1.0, 0.1, 1e-3]), "e5m2"))


def test_smoke_test_names_the_run_the_sweep_makes():
    """The README's smoke test evaluates, by name, the FP32 run its sweep line just made."""
    from common import sweep
    reproduce = section("Reproduce the results table")
    sweep_line = next(ln for ln in reproduce.splitlines() if "sweep.py --set smoke" in ln)
    assert all(f in sweep_line for f in ("--seeds 1", "--synthetic", "--epochs 1",
                                         "--max-steps-per-epoch 2"))
    assert "--model resnet8" in reproduce
    ptq_line = next(ln for ln in reproduce.splitlines()
                    if "ptq_eval.py --runs-dir /tmp/smoke" in ln)
    assert ptq_line.split()[-1] == sweep.run_name("fp32", "resnet8", 1, 0, synthetic=True,
                                                  max_steps=2)


def test_train_blocks_can_be_pasted_whole_from_the_repo_root():
    """Every ``cd <folder> && ...`` line of the Train section runs in a subshell: pasted as one
    block, the second line's ``cd`` would otherwise start from the first one's folder."""
    root = Path(__file__).resolve().parent.parent
    train = README[README.index("## Train"):README.index("### Shared flags")]
    lines = [ln for ln in train.splitlines() if re.match(r"\(?cd ", ln)]
    assert len(lines) >= 10
    for line in lines:
        folder = re.match(r"\(cd (\S+) +&& ", line)
        assert folder and (root / folder.group(1)).is_dir() and ")" in line.split("#")[0], line
