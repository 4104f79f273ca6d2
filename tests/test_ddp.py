"""Two-process DDP (gloo, CPU, launched with torch.distributed.run) against one process.

What must agree: with the same seed, the two ranks together see exactly the single process's
batches (tests/test_data.py checks that bit for bit), DDP averages their gradients, evaluation
sums are all-reduced. What legitimately differs:

* BatchNorm: each rank normalises with the statistics of its own 32 images instead of all 64
  (DDP without SyncBN, the usual setting). To compare the loop itself, the first test replaces
  BatchNorm by the identity in both runs; then only floating-point summation order differs
  (two means of 32 averaged vs one mean of 64, other convolution blockings), and the weights
  after 4 SGD steps must agree to TOLERANCE_NO_BN (absolute, per element). Seen: 6e-8 to 2e-6
  after 2 steps, 6e-6 to 2e-5 after 8 (rounding differences grow as training amplifies them),
  while the weights move by about 0.1; a wrong shard or a missing gradient average moves them
  apart by about that much.
* With BatchNorm the runs differ by the per-rank statistics; the second test only asks for the
  same training and test losses within TOLERANCE_BN_LOSS.

This file doubles as the worker script that torchrun starts (see ``__main__`` below); the
launch puts the repo root on the workers' PYTHONPATH, as pytest.ini's ``pythonpath`` does here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from common import cli, runs, train

ROOT = Path(__file__).resolve().parent.parent

TOLERANCE_NO_BN = 1e-4          # max |w_ddp - w_single| after 4 steps, summation order only
TOLERANCE_BN_LOSS = 0.05        # |loss_ddp - loss_single| (nats), 1 epoch, per-rank BN (seen: 1e-3)
pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


FLAGS = ["--synthetic", "--model", "resnet8", "--batch-size", "64", "--epochs", "1",
         "--lr", "0.02", "--device", "cpu"]


def without_bn(model):
    """Replace every BatchNorm2d by the identity (in place)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, child_name, nn.Identity())
    return model


def config(runs_dir, name, extra=()):
    parser = cli.build_parser("ddp test")
    args = cli.parse_args(parser, FLAGS + ["--runs-dir", str(runs_dir), "--name", name, *extra])
    return cli.make_config(args, script="tests/test_ddp.py")


def launch(runs_dir, name, bn, extra=()):
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(runs_dir), name, "bn" if bn else "nobn", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    steps = ("--max-steps-per-epoch", "4")
    out = launch(tmp_path, "ddp_nobn", bn=False, extra=steps)
    assert out.count("final test accuracy") == 1            # logging on rank 0 only
    train.run(config(tmp_path, "single_nobn", steps), model_transform=without_bn)
    a = runs.load_checkpoint(tmp_path / "ddp_nobn" / "last.pt")
    b = runs.load_checkpoint(tmp_path / "single_nobn" / "last.pt")
    assert a["world_size"] == 2 and b["world_size"] == 1
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert diff < TOLERANCE_NO_BN, diff
    torch.manual_seed(0)                                      # the loop's initialisation
    init = without_bn(train.build_model("resnet8")).state_dict()
    moved = max((b["model"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 100 * TOLERANCE_NO_BN                      # the comparison is not vacuous
    ma, mb = a["metrics"][0], b["metrics"][0]
    assert ma["train_images"] == mb["train_images"] == 4 * 64
    assert ma["test_images"] == mb["test_images"]
    assert abs(ma["train_loss"] - mb["train_loss"]) < 1e-4
    assert abs(ma["test_loss"] - mb["test_loss"]) < 1e-3
    summary = json.loads((tmp_path / "ddp_nobn" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 2


@pytest.mark.slow
def test_ddp_with_batchnorm_close_to_single_process(tmp_path):
    launch(tmp_path, "ddp_bn", bn=True)
    train.run(config(tmp_path, "single_bn"))
    ma = runs.read_jsonl(tmp_path / "ddp_bn" / "metrics.jsonl")[0]
    mb = runs.read_jsonl(tmp_path / "single_bn" / "metrics.jsonl")[0]
    assert abs(ma["train_loss"] - mb["train_loss"]) < TOLERANCE_BN_LOSS
    assert abs(ma["test_loss"] - mb["test_loss"]) < TOLERANCE_BN_LOSS


if __name__ == "__main__":          # worker, started by torch.distributed.run
    import gc

    runs_dir, name, mode, *extra = sys.argv[1:]
    gc.disable()       # only train.run's own collection may free the DDP wrapper's cycles
    train.run(config(runs_dir, name, extra), model_transform=None if mode == "bn" else without_bn)
    # the wrapper must be gone before its process group is: freed at interpreter exit instead,
    # a rank was once aborted there
    if any(isinstance(o, nn.parallel.DistributedDataParallel) for o in gc.get_objects()):
        sys.exit("a DistributedDataParallel wrapper outlived its run and its process group")
