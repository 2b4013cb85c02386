#!/usr/bin/env python3
"""Single-GPU codec kernel benchmark: quantize, dequantize, dequantize-and-sum and error
part of each codec, for each kernel implementation, against a bf16 copy measured in the
same run.

    python tools/bench_codec_kernels.py --json docs/results/data/codec_kernels/h200.json
    python tools/bench_codec_kernels.py --codec hadamard-int4:128 --min-size 64MB --max-size 64MB

Each ``--codec CODEC[:GROUP]`` (repeatable; the codec part of the ``--comm`` grammar) is
built as the communicator builds it (the ``weighted-`` codecs on a synthetic calibration
of ``--channels`` channels) and run through its kernel plan (codec, ``hadamard-``
rotation, ``weighted-`` channel scales) on a message of SIZE bf16 bytes, viewed as
``--rows`` chunks (the one-shot algorithm's chunks at TP = rows):

* ``quantize``: the chunks to wire bytes (the rotation and scales folded in; the Triton
  path scales with a torch multiply first, as the one-shot path does);
* ``dequantize``: one chunk's bytes back to values (fp32 with a rotation, else bf16);
* ``dequantize_sum``: ``--rows`` rows of bytes to their in-order fp32 sum (rotated back);
* ``error``: error feedback's error part of the chunks (fp32).

``--impl cuda`` is kernels/codec_cuda.py (the int8, int5 and int4 codecs), ``--impl
triton`` kernels/quant.py. Before timing, at every size, both implementations' outputs
are compared bit for bit, and at the first size against the reference codec on the CPU;
a mismatch stops the run. Times are medians over ``--iters`` replays of a CUDA graph of
``--graph-calls`` calls, between CUDA events. ``TBps`` = (bytes read + bytes written) /
time, the convention of a copy's bandwidth; ``bytes`` is the bf16 message size.

Output: a table, ``--json`` (``{"device", "date", "copy_TBps", "copy", "rows": [{"codec",
"op", "impl", "bytes", "us", "TBps", "vs_copy"}]}``) and a plot next to it. On a CPU, under
``TRITON_INTERPRET=1``, the Triton path runs (a smoke test of the tool, not a speed).

A variant of the CUDA kernels (``MEGATRON_LITE_CUDA_DEFINES``, kernels/codec_cuda.py)
builds in a directory of its own and is named in the JSON (``cuda_defines``), so that
variants run side by side, one process each:

    MEGATRON_LITE_CUDA_DEFINES=ML_SOME_VARIANT python tools/bench_codec_kernels.py ...
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

DEFAULT_CODECS = ("int8:128", "int4:128", "hadamard-int8:128", "hadamard-int4:128",
                  "weighted-hadamard-int8:128", "weighted-hadamard-int4:128",
                  "weighted-hadamard-int5:128", "weighted-hadamard-int5:64", "int5:128",
                  "weighted-hadamard-int6-sym:128",
                  "weighted-int8:128", "weighted-int4:128", "int4:64", "hadamard-int4:64")
OPS = ("quantize", "dequantize", "dequantize_sum", "error")


class BenchError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codec", action="append", metavar="CODEC[:GROUP]",
                   help="a codec (repeatable; default: " + " ".join(DEFAULT_CODECS) + ")")
    p.add_argument("--impl", action="append", choices=("cuda", "triton"),
                   help="kernel implementation (repeatable; default: cuda and triton on a "
                        "GPU, triton under TRITON_INTERPRET=1)")
    p.add_argument("--op", action="append", choices=OPS, help="operation (repeatable; "
                   "default: all)")
    p.add_argument("--min-size", default="1MB", help="smallest message, bf16 bytes (default: 1MB)")
    p.add_argument("--max-size", default="256MB", help="largest message (default: 256MB)")
    p.add_argument("--rows", type=int, default=4, help="chunks of a message and rows of a "
                   "dequantize-and-sum: the TP size (default: 4)")
    p.add_argument("--channels", type=int, default=2048,
                   help="channels of the weighted- scales (default: 2048)")
    p.add_argument("--iters", type=int, default=20, help="timed graph replays (default: 20)")
    p.add_argument("--graph-calls", type=int, default=10,
                   help="calls per captured graph (default: 10)")
    p.add_argument("--json", help="write results here (default: none)")
    p.add_argument("--plot", help="plot file (default: --json with .png)")
    return p


def parse_args(argv=None):
    """The arguments, checked; raises BenchError (or ValueError for a bad size)."""
    a = build_parser().parse_args(argv)
    from megatron_lite.lab.benchmark import parse_size   # after --help, which imports nothing
    a.min_b, a.max_b = parse_size(a.min_size), parse_size(a.max_size)
    if a.rows < 1 or a.iters < 1 or a.graph_calls < 1 or a.channels < 1:
        raise BenchError("--rows, --iters, --graph-calls and --channels must be >= 1")
    unit = 2 * a.rows * max(256, a.channels)
    if a.min_b < unit or a.min_b % unit or a.max_b < a.min_b:
        raise BenchError(f"--min-size must be a multiple of {unit} bytes (2 x --rows x "
                         f"max(256, --channels)) and <= --max-size")
    from megatron_lite.comm.codecs import CodecError
    from megatron_lite.comm.codecs.registry import parse_codec_spec
    a.codecs = []
    for text in a.codec or DEFAULT_CODECS:
        try:
            a.codecs.append(str(parse_codec_spec(text)))
        except CodecError as e:
            raise BenchError(f"--codec {text!r}: {e}") from None
    a.ops = tuple(a.op or OPS)
    return a


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except (BenchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch
    cuda = torch.cuda.is_available()
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not cuda and not interp:
        print("error: needs a CUDA GPU (or TRITON_INTERPRET=1 for a CPU smoke run of the "
              "Triton path)", file=sys.stderr)
        return 2
    impls = tuple(args.impl or (("cuda", "triton") if cuda and not interp else ("triton",)))
    if "cuda" in impls and (interp or not cuda):
        print("error: --impl cuda needs a CUDA GPU without TRITON_INTERPRET", file=sys.stderr)
        return 2
    defines = ()
    if "cuda" in impls:
        from megatron_lite.kernels import codec_cuda
        try:
            defines = codec_cuda.build_defines()
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from megatron_lite.lab import bench_codec as BC
    dev = torch.device("cuda" if cuda and not interp else "cpu")
    with tempfile.TemporaryDirectory(prefix="bench-calib-") as tmp:
        try:
            plans = BC.plans(args.codecs, os.path.join(tmp, "synthetic.safetensors"),
                             args.channels)
        except Exception as e:  # noqa: BLE001 - one line for a codec without a kernel plan
            print(f"error: {e}", file=sys.stderr)
            return 2
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    print(f"device {name}, torch {torch.__version__}; impls {', '.join(impls)}"
          + (f"; CUDA kernels built with -D{' -D'.join(defines)}" if defines else ""),
          flush=True)
    from megatron_lite.lab.benchmark import write_json
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)

    def payload_of(copy, rows, partial):
        c64 = [c for c in copy if c["bytes"] <= 64 << 20]
        out = {"device": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "command": " ".join(["tools/bench_codec_kernels.py"]
                                   + list(sys.argv[1:] if argv is None else argv)),
               "rows_per_message": args.rows, "iters": args.iters,
               "graph_calls": args.graph_calls,
               "copy_TBps": (c64 or copy)[-1]["TBps"], "copy": copy, "rows": rows}
        if defines:   # a variant build of the CUDA kernels (codec_cuda.DEFINES_ENV)
            out["cuda_defines"] = list(defines)
        if partial:   # a cut-off run keeps the sizes it finished, marked as such
            out["partial"] = True
        return out

    def save_partial(copy, rows):
        if args.json:
            write_json(args.json, payload_of(copy, rows, True))
    try:
        copy, rows = BC.sweep(args, plans, impls, dev, on_size=save_partial)
    except BC.Mismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    payload = payload_of(copy, rows, False)
    print(BC.table(payload))
    if args.json:
        write_json(args.json, payload)
        path = args.plot or os.path.splitext(args.json)[0] + ".png"
        BC.plot(payload, path)
        print(f"wrote {args.json} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
