"""How much does the training loop cost beyond the model's own forward + backward + SGD step?

Measures, at the same batch size, in the same process:

Runs bare, loop, bare, ... (``--repeats`` loops) and reports the best of each, the measurement
least disturbed by other work on a shared machine.

1. ``bare``: the model's forward, cross-entropy, backward and SGD step on a few pre-made,
   already normalised tensors on the device (no data pipeline, no bookkeeping) -- the ceiling;
2. ``loop``: the real loop (``common.train.run``) on real CIFAR-10: shuffling, batched crop+flip,
   normalisation, per-step lr, on-device loss/accuracy sums, divergence checks; its images/s is
   the training phase of the last epoch (evaluation and checkpointing are timed separately);
3. the data pipeline alone (batches drawn, nothing trained): its time per image over the bare
   model's is a second, steadier estimate of the overhead (``pipeline_cost_percent``).

On a machine shared with other work, two OpenMP threads can stall each other badly (steps seen
10x slower): compare figures from a quiet machine, or use ``--threads 1``.

Target (issue 3): loop images/s >= bare images/s / 1.10 on the 2-core CPU, i.e. the pipeline
costs at most 10% over the model alone. On a GPU the same script reports FP32 and BF16
(``--autocast bf16``) epoch seconds.

    python benchmarks/pipeline_speed.py --device cpu --data-dir ../shared/cifar10     # 1 epoch
    python benchmarks/pipeline_speed.py --device cpu --steps 60                        # quicker
    python benchmarks/pipeline_speed.py --device cuda --epochs 2 --autocast none bf16
    python benchmarks/pipeline_speed.py --device cpu --steps 40 --channels-last both  # layout

``--fake-data`` replaces CIFAR-10 by random uint8 images of the same size (50,000 / 10,000), for a
machine without the dataset: speed does not depend on pixel values.
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import cli, data, hardware, train  # noqa: E402
from common.resnet import MODELS, build_model  # noqa: E402

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def bare_images_per_s(model_name, device, batch, steps, channels_last, autocast_dtype, seed=0,
                      compile=False):
    """fwd + loss + bwd + SGD step on 4 pre-made normalised batches; returns images/s."""
    torch.manual_seed(seed)
    model = build_model(model_name).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    if compile:  # the loop's mode (common.train.compile_mode): CUDA graphs on a GPU
        model = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
          for _ in range(4)]
    ys = [torch.randint(0, 10, (batch,), device=device) for _ in range(4)]
    model.train()

    def step(i):
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            loss = F.cross_entropy(model(xs[i % 4]), ys[i % 4])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    warmup = 10 if compile else 5                  # allocator, cuDNN autotuning, compile, graphs
    for i in range(min(warmup, steps)):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_run(args, device, channels_last, autocast_dtype, runs_dir, tag):
    """The real loop for args.epochs epochs; returns the last epoch's metrics row."""
    flags = ["--model", args.model, "--batch-size", str(args.batch_size),
             "--epochs", str(args.epochs), "--device", device.type,
             "--runs-dir", runs_dir, "--name", tag,
             "--channels-last" if channels_last else "--no-channels-last"]
    if args.steps:
        flags += ["--max-steps-per-epoch", str(args.steps)]
    if args.compile:
        flags += ["--compile"]
    if args.data_dir:
        flags += ["--data-dir", args.data_dir]
    config = cli.make_config(cli.parse_args(cli.build_parser("bench"), flags), script="benchmark")
    train.run(config, autocast_dtype=autocast_dtype)
    with open(os.path.join(runs_dir, tag, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f][-1]


def pipeline_images_per_s(device_data, batch, steps, channels_last):
    """Draw batches (shuffle, crop, flip, normalise) without training; images/s."""
    norm = data.Normalizer(device_data.device, channels_last=channels_last)
    tb = data.TrainBatches(device_data, batch, data.make_generator(device_data.device, 0), norm,
                           max_steps=steps)
    sync(device_data.device)
    t0 = time.perf_counter()
    n = 0
    for x, _ in tb:
        n += x.shape[0]
    sync(device_data.device)
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--model", default="resnet20", choices=list(MODELS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1, help="loop epochs; the last one is reported")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per epoch and for the bare loop (default: a full epoch, 390)")
    p.add_argument("--bare-steps", type=int, default=50, help="steps per bare measurement")
    p.add_argument("--repeats", type=int, default=2,
                   help="loop runs, interleaved with bare runs; the best of each is reported")
    p.add_argument("--data-dir", default=None, help="as the training scripts' --data-dir")
    p.add_argument("--fake-data", action="store_true", help="random images of CIFAR-10's size")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off", "both"])
    p.add_argument("--autocast", nargs="+", default=["none"], choices=list(AUTOCAST))
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, i.e. all cores)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = train.resolve_device(args.device)
    except cli.UserError as e:
        p.error(str(e))
    layouts = {"auto": [train.CHANNELS_LAST_DEFAULT[device.type]], "on": [True], "off": [False],
               "both": [False, True]}[args.channels_last]

    if args.fake_data:             # route the loader to random arrays of the real size
        def fake(data_dir=None, download=True):
            import numpy as np
            rng = np.random.default_rng(0)
            return (rng.integers(0, 256, (50_000, 3, 32, 32), dtype=np.uint8),
                    rng.integers(0, 10, 50_000),
                    rng.integers(0, 256, (10_000, 3, 32, 32), dtype=np.uint8),
                    rng.integers(0, 10, 10_000), "fake")
        data.load_cifar10 = fake
    dd = data.load_device_data(device, args.data_dir)
    steps = args.steps or data.steps_per_epoch(dd.train_x.shape[0], args.batch_size)
    print(f"device {device} ({hardware.device_name(device)}), torch {torch.__version__}, "
          f"{args.model}, batch {args.batch_size}, {steps} steps/epoch, data {dd.source}",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for cl in layouts:
            pipe = pipeline_images_per_s(dd, args.batch_size, steps, cl)
            for ac_name in args.autocast:
                ac = AUTOCAST[ac_name]
                tag = f"{ac_name}_cl{int(cl)}{'_compiled' if args.compile else ''}"
                bares, loops, rows = [], [], []
                bare_steps = min(steps, args.bare_steps)
                for rep in range(args.repeats):        # bare, loop, bare, loop, ..., bare
                    bares.append(bare_images_per_s(args.model, device, args.batch_size,
                                                   bare_steps, cl, ac, compile=args.compile))
                    rows.append(loop_run(args, device, cl, ac, runs_dir, f"{tag}_{rep}"))
                    loops.append(rows[-1]["images_per_s"])
                bares.append(bare_images_per_s(args.model, device, args.batch_size, bare_steps,
                                               cl, ac, compile=args.compile))
                # best of each: the run least disturbed by other work on a shared machine
                bare, loop = max(bares), max(loops)
                row = rows[loops.index(loop)]
                r = {"device": str(device), "device_name": hardware.device_name(device),
                     "model": args.model, "batch_size": args.batch_size, "steps": steps,
                     "bare_steps": bare_steps, "channels_last": cl, "autocast": ac_name,
                     "compile": args.compile,
                     "pipeline_only_images_per_s": round(pipe),
                     "bare_images_per_s": round(bare), "bare_runs": [round(b) for b in bares],
                     "loop_images_per_s": round(loop), "loop_runs": [round(v) for v in loops],
                     "loop_train_seconds": row["train_seconds"],
                     "loop_epoch_seconds": row["epoch_seconds"],
                     "overhead_percent": round(100 * (bare / loop - 1), 1),
                     "pipeline_cost_percent": round(100 * bare / pipe, 2)}
                results.append(r)
                print(f"\n[{tag}] channels-last {'on' if cl else 'off'}, autocast {ac_name}"
                      f"{', compiled' if args.compile else ''}")
                print(f"  data pipeline alone (shuffle, crop+flip, normalise): "
                      f"{pipe:>10,.0f} img/s")
                print(f"  bare fwd+bwd+step on pre-made tensors:             {bare:>10,.0f} img/s "
                      f"(best of {r['bare_runs']}, {bare_steps} steps each)")
                print(f"  real loop, training phase of the last epoch:       {loop:>10,.0f} img/s "
                      f"(best of {r['loop_runs']}; {row['train_seconds']:.1f} s train, "
                      f"{row['epoch_seconds']:.1f} s with eval)")
                print(f"  pipeline overhead over the model alone: {r['overhead_percent']:+.1f}% "
                      f"measured (loop vs bare), {r['pipeline_cost_percent']:.2f}% from the parts "
                      f"(pipeline time / model time) (target <= +10%)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
