#!/usr/bin/env python3
"""All-reduce benchmark: every ``--comm`` spec against the native (NCCL) all-reduce, measured
in the same run, as the engine runs it.

    torchrun --nproc_per_node=4 tools/bench_allreduce.py --json docs/results/allreduce_w4.json
    torchrun --nproc_per_node=2 tools/bench_allreduce.py --comm int4:128,path=fused \\
        --comm hadamard-int8:128,path=fused --comm auto --max-size 64MB
    torchrun --nproc_per_node=2 tools/bench_allreduce.py --host-overhead --comm int4:128
    torchrun --nproc_per_node=1 tools/bench_allreduce.py --host-overhead --comm int4:128,path=fused
    torchrun --nproc_per_node=2 tools/bench_allreduce.py --transport host-memory ...

Each ``--comm SPEC`` (repeatable; the grammar of every tool) is built with
``build_communicator`` and called as the model calls it, ``all_reduce(x, site)`` on a
``[-1, --channels]`` bf16 message; ``path=fused`` times the fused two-shot kernel,
``path=two-step`` the portable path, ``algo=one-shot`` the one-shot kernels (on NCCL),
plain specs the measured size chooser. ``native`` is always measured first, and
``--oneshot`` adds the fused one-shot bf16 kernel on its own. Calibrated codecs
(``weighted-``, ``outlier-int4``, ``klt``) get a synthetic calibration file unless the
spec names one (megatron_lite/lab/bench_comm.py).

For every message size (bf16 bytes, --min-size .. --max-size in powers of 2):

1. correctness first: the relative L2 error against the exact sum (an fp32 all-reduce of
   the fp32 upcast of the same random inputs), and whether every rank holds bitwise the
   same output;
2. the median latency over --iters timed calls after warm-up (GPU: CUDA events; messages
   up to --graph-max as CUDA-graph replays of --graph-calls calls); the slowest rank's
   median is reported;
3. algbw = bytes / time, busbw = algbw * 2(W-1)/W (nccl-tests convention), and the
   speed-up over native. ``path`` records which backend served the message.

``--transport host-memory`` / ``socket`` emulates a slower link by routing NCCL through
host shared memory (``NCCL_P2P_DISABLE=1``: PCIe GPUs without peer access) or sockets
(also ``NCCL_SHM_DISABLE=1``: a cross-node Ethernet link); native is measured on the
same transport, and the JSON's ``transport`` says which one ran (``gloo`` on a CPU);
``transport_detected`` is what the communicator found (comm/transport.py), the one the
``auto`` chooser's table follows (a host-memory or socket run has no fused kernels).

Output: a table, --json (rows, the auto thresholds this run supports, device, NCCL
version, transport, date, command) and a plot next to it. Runs on gloo (CPU) too, as a
smoke test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

DEFAULT_COMMS = ("bf16,path=fused", "int8:128,path=fused", "int4:128,path=fused",
                 "int4-int8:128,path=fused", "fp8:128,path=fused", "int3:128,path=fused",
                 "int2:128,path=fused", "hadamard-int8:128,path=fused",
                 "weighted-hadamard-int8:128,path=fused", "hadamard-int4:128,path=fused",
                 "int4:128,path=two-step", "int4:128,algo=one-shot,path=two-step",
                 "int4:128,algo=one-shot", "ef+int4:128,algo=one-shot", "int4:128", "auto")


SYNTHETIC = "<synthetic>"    # stands for the synthetic calibration file until it exists


class BenchError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comm", action="append", metavar="SPEC",
                   help="an all-reduce setting in --comm syntax (repeatable; default: "
                        + " ".join(DEFAULT_COMMS) + ")")
    p.add_argument("--oneshot", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the fused one-shot bf16 kernel up to --oneshot-max (default: on)")
    p.add_argument("--min-size", default="16KB", help="smallest message, bf16 bytes (default: 16KB)")
    p.add_argument("--max-size", default="256MB", help="largest message, bf16 bytes (default: 256MB)")
    p.add_argument("--iters", type=int, default=50, help="timed calls per size (default: 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (default: 5)")
    p.add_argument("--graph-max", default="64MB",
                   help="time messages up to this as CUDA-graph replays, as the engine runs them "
                        "(default: 64MB)")
    p.add_argument("--graph-calls", type=int, default=10, help="calls per captured graph (default: 10)")
    p.add_argument("--oneshot-max", default="2MB", help="one-shot workspace size (default: 2MB)")
    p.add_argument("--channels", type=int, default=2048,
                   help="hidden size of a message (viewed as [-1, CHANNELS]; it must divide "
                        "every message) and of the synthetic calibration (default: 2048)")
    p.add_argument("--host-overhead", action="store_true", default=False,
                   help="instead of the size sweep: host microseconds of an eager call of "
                        "each --comm at --min-size: dispatch before the backend, whole call "
                        "(default: off)")
    p.add_argument("--calibration", help="calibration file for calibrated codecs made for "
                                         "this TP size and --channels (default: synthetic)")
    p.add_argument("--transport", choices=("nvlink", "host-memory", "socket"),
                   help="emulate a transport (NCCL only): nvlink leaves NCCL its choice, "
                        "host-memory sets NCCL_P2P_DISABLE=1 (PCIe GPUs without peer "
                        "access), socket also NCCL_SHM_DISABLE=1 (a cross-node link); "
                        "recorded as the JSON's transport (default: from the environment)")
    p.add_argument("--json", help="write results here, rank 0 (default: none)")
    p.add_argument("--plot", help="plot file (default: --json with .png)")
    return p


def parse_args(argv=None):
    """The arguments, checked; raises BenchError (or ValueError for a bad size)."""
    a = build_parser().parse_args(argv)
    from megatron_lite.lab.benchmark import parse_size   # after --help, which imports nothing
    a.min_b, a.max_b = parse_size(a.min_size), parse_size(a.max_size)
    a.graph_max_b, a.oneshot_max_b = parse_size(a.graph_max), parse_size(a.oneshot_max)
    if a.min_b < 16 or a.max_b < a.min_b:
        raise BenchError("--min-size must be >= 16 bytes and <= --max-size")
    if a.iters < 1 or a.warmup < 0 or a.graph_calls < 1:
        raise BenchError("--iters and --graph-calls must be >= 1, --warmup >= 0")
    from megatron_lite.kernels.workspace import ONESHOT_MAX_BYTES
    if a.oneshot_max_b > ONESHOT_MAX_BYTES:
        raise BenchError(f"--oneshot-max must be at most {ONESHOT_MAX_BYTES >> 20}MB (the "
                         "one-shot kernel's largest message)")
    if a.channels < 1 or (a.min_b // 2) % a.channels:
        raise BenchError(f"--channels {a.channels} must divide the smallest message "
                         f"({a.min_b // 2} values)")
    from megatron_lite.comm.spec import parse_comm
    from megatron_lite.errors import MegatronLiteError
    a.specs = {}
    for text in a.comm or DEFAULT_COMMS:
        try:
            spec = parse_comm(text, a.calibration or SYNTHETIC)
        except MegatronLiteError as e:
            raise BenchError(f"--comm {text!r}: {e}") from None
        if not spec.is_native:
            a.specs[text.strip()] = spec
    return a


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except (BenchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "LOCAL_RANK" not in os.environ:
        print("error: run under torchrun (NCCL on GPUs, gloo on CPU)", file=sys.stderr)
        return 2
    import torch
    import torch.distributed as dist

    from megatron_lite.comm.build import build_communicator
    from megatron_lite.comm.codecs.registry import entry
    from megatron_lite.comm.communicator import DistCommunicator
    from megatron_lite.lab import bench_comm as B

    from megatron_lite.lab.benchmark import apply_transport, transport_label
    cuda = torch.cuda.is_available()
    if args.transport and not cuda:
        print("error: --transport needs NCCL on CUDA GPUs (gloo runs over sockets)",
              file=sys.stderr)
        return 2
    apply_transport(args.transport)
    if cuda:
        # NVLink multicast can take the host's GPUs out of service (device notes): keep it off.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    device_name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    nccl_version = ".".join(map(str, torch.cuda.nccl.version())) if cuda else None
    base = DistCommunicator()
    tmp = tempfile.TemporaryDirectory(prefix="bench-calib-")
    calib = None
    if any(s.calibration == SYNTHETIC and any(entry(c.name).traits.calibrated
                                              for c in s.codecs())
           for s in args.specs.values()):
        calib = B.synthetic_calibration(os.path.join(tmp.name, "synthetic.safetensors"),
                                        args.channels, world)
    comms, klt_specs = {}, set()
    try:
        for label, spec in args.specs.items():
            if spec.calibration == SYNTHETIC:
                spec = spec.replace(calibration=calib.path if calib else None)
            comms[label] = build_communicator(base, spec, max_bytes=args.max_b)
            if calib is not None and any(entry(c.name).traits.one_shot_only
                                         for c in spec.codecs()):
                klt_specs.add(label)
    except Exception as e:  # noqa: BLE001 - one line for any bad spec or file
        say(f"error: {e}")
        return 2
    say(f"device {device_name} x {world}, NCCL {nccl_version}, torch {torch.__version__}")
    payload = {"device": device_name, "world": world, "nccl_version": nccl_version,
               "transport": transport_label(dist.get_backend()),
               "transport_detected": str(base.transport),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "command": " ".join(["tools/bench_allreduce.py"] + list(argv or sys.argv[1:])),
               "channels": args.channels}
    if args.host_overhead:
        x = torch.randn(args.min_b // 2, device=dev).to(torch.bfloat16).view(-1, args.channels)
        payload["host_overhead"] = {}
        if world == 1:
            payload["host_overhead_note"] = (
                "one rank: each call is the communicator's route (the plan and the "
                "backend's launches as at W > 1; the sum a one-rank round trip)")
        for label, comm in comms.items():
            if args.specs[label].error_feedback:
                say(f"{label}: skipped (error feedback runs its own path per call)")
                continue
            if world == 1 and cuda:
                # a one-rank workspace, so that the fused kernels launch as they do at W > 1
                from megatron_lite.comm.fused import install_fused
                install_fused(comm, max_bytes=args.max_b, one_rank=True)
            if comm.plan(x, B.SITE).backend is None:
                say(f"{label}: skipped ({comm.explain(x, B.SITE)})")
                continue
            res = B.host_overhead(comm, x, B.SITE)
            payload["host_overhead"][label] = res
            gpu = f"   device {res['gpu_us']:9.2f} us" if "gpu_us" in res else ""
            say(f"{label:40s} dispatch {res['dispatch_us']:7.2f} us   call "
                f"{res['call_us']:9.2f} us{gpu}   rel err {res['rel_err']:.2e}   "
                f"({res['path']}, {x.numel() * 2} B)")
    else:
        payload.update(iters=args.iters, graph_max_bytes=args.graph_max_b,
                       graph_calls=args.graph_calls, rows=_sweep(args, comms, klt_specs, calib,
                                                                 base, dev, world, say))
        payload["auto_thresholds"] = B.derive_thresholds(payload["rows"])
        say(B.table(payload["rows"], world))
        say(f"auto thresholds this run supports ({device_name}, world {world}): "
            f"{json.dumps(payload['auto_thresholds'])}")
    if rank == 0 and args.json:
        from megatron_lite.lab.benchmark import write_json
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, payload)
        if "rows" in payload:
            path = args.plot or os.path.splitext(args.json)[0] + ".png"
            B.plot(payload["rows"], f"all-reduce latency, {world} x {device_name}", path)
            say(f"wrote {args.json} and {path}")
        else:
            say(f"wrote {args.json}")
    tmp.cleanup()
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _sweep(args, comms, klt_specs, calib, base, dev, world, say):
    import math

    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from megatron_lite.lab import bench_comm as B
    rank = dist.get_rank()
    sizes, s = [], args.min_b
    while s <= args.max_b:
        sizes.append(s)
        s *= 2
    oneshot = None
    if args.oneshot and dev.type == "cuda":
        from megatron_lite.comm.fused import make_state
        state = make_state(None, max_bytes=args.oneshot_max_b,
                           oneshot_max_bytes=args.oneshot_max_b)
        if state.ws is None:
            say(f"one-shot kernel unavailable: {state.why}")
        else:
            from megatron_lite.kernels import fused_allreduce as fa
            oneshot = (state.ws, fa)
    rows, native_us = [], {}
    bar = tqdm(sizes, desc="sizes", disable=rank != 0)
    for nbytes in bar:
        n = nbytes // 2
        g = torch.Generator(device=dev).manual_seed(1000 * int(math.log2(nbytes)) + rank)
        x0 = torch.randn(n, generator=g, device=dev).to(torch.bfloat16).view(-1, args.channels)
        variants = [("native", lambda x: base.all_reduce(x), None)]
        if oneshot is not None and nbytes <= args.oneshot_max_b:
            ws, fa = oneshot
            variants.append(("oneshot-kernel", lambda x: fa.one_shot_all_reduce(ws, x), None))
        for label, comm in comms.items():
            variants.append((label, lambda x, c=comm: c.all_reduce(x, B.SITE), comm))
        for label, fn, comm in variants:
            bar.set_postfix_str(label)
            x = calib.klt_input(x0, rank) if label in klt_specs else x0
            ref = x.float()
            dist.all_reduce(ref)
            out = fn(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            rel, same = B.check(out, ref)
            del out
            us, graphed = B.time_call(lambda: fn(x), nbytes, args.iters, args.warmup,
                                      args.graph_max_b, args.graph_calls, dev)
            if label == "native":
                native_us[nbytes] = us
            algbw = nbytes / us / 1e3
            rows.append({"bytes": nbytes, "comm": label, "us": round(us, 2),
                         "algbw_GBps": round(algbw, 3),
                         "busbw_GBps": round(algbw * 2 * (world - 1) / world, 3),
                         "speedup_vs_native": round(native_us[nbytes] / us, 3),
                         "rel_err": float(f"{rel:.3e}"), "ranks_identical": same,
                         "graph": graphed,
                         "path": comm.explain(x, B.SITE) if comm is not None else label})
    return rows


if __name__ == "__main__":
    sys.exit(main())
