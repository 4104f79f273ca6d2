"""Speed of common.quant.quantize beside torch's native casts, qtorch and qtorch-plus.

One run, one float32 tensor (default 4M elements of 10 * N(0, 1)), one Markdown table: millions
of elements per second for each format and rounding mode, for this project's plain call
``quantize(x, fmt)`` (which picks its own path), its eager path and its compiled path, beside
torch's native cast (bf16, fp16, float8) and the seed's libraries (qtorch ``float_quantize`` for
floats, qtorch-plus ``posit_quantize`` for posits). Each figure is the best of several timed calls
after warm-up (compiling happens during warm-up and is not counted). GB/s counts 8 bytes per
element (read float32, write float32); "% copy" compares it with a plain tensor copy measured in
the same run, the practical ceiling of an element-wise op.

    python benchmarks/quant_speed.py                          # CPU, 4M elements
    python benchmarks/quant_speed.py --device cuda --numel 64M
    python benchmarks/quant_speed.py --sizes                  # eager vs compiled on small tensors
    python benchmarks/quant_speed.py --blocks-only            # block formats vs per-tensor scaling

Block formats (mxfp8, mxfp4, nvfp4, ...) get their own table after the main one: each beside its
element format with per-tensor scaling, ``quantize_scaled(x, element, "tensor")``, on the same
tensor as 1-D, as NCHW [N, 64, H, W] contiguous (blocks strided in memory) and channels-last
(blocks contiguous); the ratio column is block / per-tensor throughput, timed alternately in one
run so that a busy machine slows both alike. On a machine that other jobs keep busy,
``--clock thread`` times this thread's CPU time with one torch thread instead of elapsed time.

qtorch and qtorch-plus are optional (pip install qtorch qtorch-plus ninja); both compile C++ at
first import (~20 s each), which is outside the timings. Their columns read n/a when missing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from common import hardware  # noqa: E402
from common.formats import parse_format  # noqa: E402
from common.qtorch_backend import import_isolated  # noqa: E402
from common.quant import (  # noqa: E402
    _quantize_compiled,
    _quantize_eager,
    quantize,
    quantize_scaled,
)

DEFAULT_FORMATS = ("bf16", "fp16", "e4m3", "e5m2", "e2m1", "e2m3", "e3m2", "posit8es0",
                   "posit8es1", "posit8es2", "posit16es1", "posit16es2")
DEFAULT_BLOCK_FORMATS = ("mxfp8", "mx-e5m2", "mxfp6", "mx-e3m2", "mxfp4", "nvfp4")
NATIVE_CASTS = {"bf16": torch.bfloat16, "fp16": torch.float16, "e4m3": torch.float8_e4m3fn,
                "e5m2": torch.float8_e5m2}
BYTES_PER_ELEMENT = 8  # float32 in, float32 out

# Nominal memory bandwidth (GB/s) of cards this project is run on, by a substring of
# torch.cuda.get_device_name(); used only to put the measured figures in context.
NOMINAL_GBPS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0),
                ("H100", 3350.0),  # H100 SXM5 80GB HBM3
                ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0))


def parse_count(text: str) -> int:
    """'4M' -> 4*2^20, '64M' -> 64*2^20, '1024' -> 1024 (K, M, G are powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an element count: {text!r} (e.g. 4M, 65536)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the tensor lives")
    p.add_argument("--numel", type=parse_count, default=parse_count("4M"),
                   help="elements of the float32 tensor (K/M/G suffixes are powers of 1024)")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help="comma-separated format specs")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default)")
    p.add_argument("--clock", default="wall", choices=("wall", "thread"),
                   help="wall: elapsed time; thread: this thread's CPU time, with one torch "
                        "thread (steadier on a machine that other jobs keep busy)")
    p.add_argument("--min-time", type=float, default=0.3,
                   help="seconds of timed calls per figure (at least 3 calls)")
    p.add_argument("--no-references", action="store_true",
                   help="skip qtorch / qtorch-plus even when installed")
    p.add_argument("--block-formats", default=",".join(DEFAULT_BLOCK_FORMATS),
                   help="comma-separated block format specs for the block table ('' skips it)")
    p.add_argument("--blocks-only", action="store_true",
                   help="only the block table (block vs per-tensor scaling)")
    p.add_argument("--sizes", action="store_true",
                   help="instead: eager vs compiled per tensor size (sets the auto threshold)")
    return p


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # --clock thread: time.thread_time


def time_call(fn, device: str, min_time: float) -> float:
    """Best seconds per call over batches of calls, after two warm-up calls."""
    fn()
    fn()
    sync(device)
    best, spent, reps = float("inf"), 0.0, 1
    while True:
        sync(device)
        t0 = CLOCK()
        for _ in range(reps):
            fn()
        sync(device)
        dt = CLOCK() - t0
        best = min(best, dt / reps)
        spent += dt
        if spent >= min_time and reps >= 3:
            return best
        reps = min(reps * 2, 64)


def import_reference(pkg: str):
    """qtorch / qtorch_plus quant module, each JIT-built in its own extension folder (both name
    their extension "quant_cpu": sharing a folder rebuilds one whenever the other was imported)."""
    try:
        return import_isolated(pkg)
    except Exception as err:  # not installed, or no compiler for its extension
        print(f"# {pkg}: not available ({type(err).__name__}: {str(err).splitlines()[0]})")
        return None


def machine_line(device: str) -> str:
    line = (f"CPU {hardware.cpu_name()}, {os.cpu_count()} logical cores, torch "
            f"{torch.__version__} using {torch.get_num_threads()} threads")
    if device == "cuda":
        line = f"GPU {torch.cuda.get_device_name()}; " + line
    return line


def nominal_bandwidth(device: str):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((gbps for key, gbps in NOMINAL_GBPS if key in name), None)


def fmt_rate(seconds, numel):
    return "n/a" if seconds is None else f"{numel / seconds / 1e6:,.0f}"


def main_table(args) -> None:
    device, numel = args.device, args.numel
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(numel, generator=gen, device=device) * 10
    qt = qtp = None
    if not args.no_references:
        qt, qtp = import_reference("qtorch"), import_reference("qtorch_plus")

    copy_s = time_call(lambda: x.clone(), device, args.min_time)
    copy_gbps = BYTES_PER_ELEMENT * numel / copy_s / 1e9
    nominal = nominal_bandwidth(device)

    print(f"# {machine_line(device)}")
    print(f"# float32 tensor of {numel:,} elements on {device}, {args.clock} clock; copy: "
          f"{fmt_rate(copy_s, numel)} "
          f"M el/s = {copy_gbps:,.0f} GB/s"
          + (f" ({100 * copy_gbps / nominal:.0f}% of the card's nominal {nominal:,.0f} GB/s)"
             if nominal else ""))
    print()
    head = ["format", "rounding", "quantize (auto)", "eager", "compiled", "torch cast",
            "qtorch / qtorch-plus", "auto / reference", "auto GB/s", "% copy"]
    if nominal:
        head.append("% nominal")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * len(head)) + "|")
    nearest_auto = {}
    for spec in [s.strip() for s in args.formats.split(",") if s.strip()]:
        fmt = parse_format(spec)
        for rounding in ("nearest", "stochastic"):
            t_auto = time_call(lambda: quantize(x, fmt, rounding), device, args.min_time)
            t_eager = time_call(lambda: _quantize_eager(x, fmt, rounding), device, args.min_time)
            try:
                t_comp = time_call(lambda: _quantize_compiled(x, fmt, rounding), device,
                                   args.min_time)
            except Exception as err:  # report, do not hide: auto then ran eager
                print(f"# {spec} {rounding}: compiled path failed: {type(err).__name__}")
                t_comp = None
            t_cast = None
            if rounding == "nearest" and fmt.name in NATIVE_CASTS:
                dt = NATIVE_CASTS[fmt.name]
                t_cast = time_call(lambda: x.to(dt).to(torch.float32), device, args.min_time)
            t_ref, ref_note = None, ""
            if fmt.is_posit and qtp is not None:
                t_ref = time_call(lambda: qtp.posit_quantize(x, fmt.bits, fmt.es,
                                                             rounding=rounding),
                                  device, args.min_time)
                if rounding == "stochastic":
                    ref_note = " (rounds to nearest)"  # qtorch-plus ignores stochastic for posits
            elif fmt.is_float and qt is not None:
                t_ref = time_call(lambda: qt.float_quantize(x, fmt.exp_bits, fmt.man_bits,
                                                            rounding=rounding),
                                  device, args.min_time)
            gbps = BYTES_PER_ELEMENT * numel / t_auto / 1e9
            row = [spec, rounding, fmt_rate(t_auto, numel), fmt_rate(t_eager, numel),
                   fmt_rate(t_comp, numel), fmt_rate(t_cast, numel),
                   fmt_rate(t_ref, numel) + ref_note,
                   "n/a" if t_ref is None else f"{t_ref / t_auto:.1f}x",
                   f"{gbps:,.0f}", f"{100 * gbps / copy_gbps:.0f}%"]
            if nominal:
                row.append(f"{100 * gbps / nominal:.0f}%")
            if rounding == "nearest":
                nearest_auto[spec] = t_auto
            else:
                row[1] = f"stochastic ({nearest_auto[spec] / t_auto:.2f}x of nearest)"
            print("| " + " | ".join(row) + " |", flush=True)


def time_alternating(fns: dict, device: str, min_time: float, rounds: int = 5) -> dict:
    """Best seconds per call of each function, timed in turn for `rounds` rounds: on a shared
    machine both sides of a ratio then see the same load."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], time_call(fn, device, min_time / rounds))
    return best


def block_layouts(x: torch.Tensor) -> dict:
    """x as 1-D, NCHW [N, 64, H, W] contiguous and channels-last (when numel allows)."""
    out = {"1-D": x}
    c, hw = 64, 16 * 16
    if x.numel() % (c * hw) == 0:
        nchw = x.view(-1, c, 16, 16)
        out["NCHW"] = nchw
        out["NHWC"] = nchw.contiguous(memory_format=torch.channels_last)
    return out


def block_table(args) -> None:
    device, numel = args.device, args.numel
    specs = [s.strip() for s in args.block_formats.split(",") if s.strip()]
    if not specs:
        return
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(numel, generator=gen, device=device) * 10
    if args.blocks_only:
        print(f"# {machine_line(device)}")
    print(f"# block formats vs their element with per-tensor scaling, {numel:,} elements on "
          f"{device}, {args.clock} clock; M el/s; ratio = block / per-tensor (target >= 0.5)")
    print()
    head = ["format", "layout", "rounding", "block (auto)", "eager", "compiled",
            "per-tensor element", "ratio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * len(head)) + "|")
    for spec in specs:
        fmt = parse_format(spec)
        elem = fmt.element if fmt.is_block else fmt
        for layout, xl in block_layouts(x).items():
            for rounding in ("nearest", "stochastic"):
                t = time_alternating({
                    "block": lambda: quantize(xl, fmt, rounding),
                    "tensor": lambda: quantize_scaled(xl, elem, "tensor", rounding)},
                    device, args.min_time)
                t_eager = time_call(lambda: _quantize_eager(xl, fmt, rounding), device,
                                    args.min_time)
                try:
                    t_comp = time_call(lambda: _quantize_compiled(xl, fmt, rounding), device,
                                       args.min_time)
                except Exception as err:  # report, do not hide: auto then ran eager
                    print(f"# {spec} {rounding}: compiled path failed: {type(err).__name__}")
                    t_comp = None
                row = [spec, layout, rounding, fmt_rate(t["block"], numel),
                       fmt_rate(t_eager, numel), fmt_rate(t_comp, numel),
                       f"{fmt_rate(t['tensor'], numel)} ({elem})",
                       f"{t['tensor'] / t['block']:.2f}x"]
                print("| " + " | ".join(row) + " |", flush=True)


def sizes_table(args) -> None:
    device = args.device
    print(f"# {machine_line(device)}")
    print("# M elements/s by tensor size: eager vs compiled (quantize switches at "
          "common.dispatch.EAGER_CAST_BELOW / EAGER_BITS_BELOW)")
    sizes = [1 << k for k in range(8, 23, 2)]
    print("| format | rounding | path | " + " | ".join(f"{n:,}" for n in sizes) + " |")
    print("|" + "|".join(["---"] * (3 + len(sizes))) + "|")
    for spec in ("bf16", "e4m3", "posit8es1"):
        for rounding in ("nearest", "stochastic"):
            for name, fn in (("eager", _quantize_eager), ("compiled", _quantize_compiled)):
                cells = []
                for n in sizes:
                    x = torch.randn(n, device=device) * 10
                    t = time_call(lambda: fn(x, spec, rounding), device, args.min_time / 4)
                    cells.append(fmt_rate(t, n))
                print(f"| {spec} | {rounding} | {name} | " + " | ".join(cells) + " |",
                      flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.clock == "thread":
        if args.device == "cuda":
            print("error: --clock thread measures CPU time, not a GPU's", file=sys.stderr)
            return 2
        global CLOCK
        CLOCK = time.thread_time
        args.threads = 1  # other threads' work would not be counted
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        for spec in args.formats.split(",") + args.block_formats.split(","):
            if spec.strip():
                parse_format(spec)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.sizes:
        sizes_table(args)
    elif args.blocks_only:
        block_table(args)
    else:
        main_table(args)
        print()
        block_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
