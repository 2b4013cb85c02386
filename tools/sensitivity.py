#!/usr/bin/env python
"""Per-layer bit allocation from measured sensitivity (megatron_lite/lab/eval/sensitivity.py).

    python tools/sensitivity.py --ckpt DIR --tp 4 --text calib.txt --skip-seqs 64 \\
        --codec hadamard-int3:128 --codec hadamard-int4:128 --codec hadamard-int8:128 \\
        --budget 4.3 --out alloc.json

Measures KL(bf16 || codec-at-one-site) for every row-parallel site and candidate codec
on ``--num-seqs`` windows of ``--seq-len`` tokens (simulated TP unless under torchrun),
then prints the ``--comm`` string that minimises the summed KL within ``--budget`` mean
bits per value, and writes sensitivities + allocation to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--codec", action="append", required=True, help="candidate (repeatable)")
    p.add_argument("--budget", type=float, default=4.3, help="mean bits/value (4.3)")
    p.add_argument("--num-seqs", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--skip-seqs", type=int, default=0)
    p.add_argument("--out", help="JSON with sensitivities and the allocation")
    p.add_argument("--from-json", help="reuse the sensitivities of an earlier --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from megatron_lite.checkpoint.loader import inspect_checkpoint
    from megatron_lite.comm.codecs import codec_bits, parse_codec_spec, traits
    from megatron_lite.comm.router import SiteCodecs
    from megatron_lite.comm.spec import parse_comm
    from megatron_lite.errors import MegatronLiteError, report_error
    from megatron_lite.lab.eval.data import load_text_windows
    from megatron_lite.lab.eval.report import atomic_write
    from megatron_lite.lab.eval.runner import row_parallel_sites, torchrun_world_size
    from megatron_lite.lab.eval.sensitivity import allocate, comm_string, measure
    from megatron_lite.models.config import ModelConfig

    try:
        codecs = [str(parse_codec_spec(c)) for c in args.codec]
        if any(traits(c).calibrated for c in codecs):
            raise ValueError("calibrated codecs (outlier-, weighted-, klt) need per-site "
                             "calibration; not supported here")
        bits = {c: codec_bits(c) for c in codecs}
        hf_config, _ = inspect_checkpoint(args.ckpt, args.tp)
        num_layers = ModelConfig.from_hf(hf_config).num_layers
        if args.from_json:
            with open(args.from_json) as f:
                sens = json.load(f)["kl"]
            sens = {s: {c: v[c] for c in codecs} for s, v in sens.items()}
        else:
            tok = AutoTokenizer.from_pretrained(args.ckpt)
            want = args.skip_seqs + args.num_seqs
            tw = load_text_windows(tok, args.text, args.seq_len, want * (args.seq_len - 1))
            if len(tw.windows) < want:
                raise ValueError(f"{args.text}: only {len(tw.windows)} windows")
            windows = tw.windows[args.skip_seqs:want]
            sens = None
    except (MegatronLiteError, ValueError, OSError, KeyError) as e:
        return report_error(e)
    if sens is None:
        sens = measure(args.ckpt, args.tp, num_layers, codecs, windows,
                       simulated=torchrun_world_size() is None,
                       progress=not args.no_progress)
        if sens is None:        # non-zero real rank
            return 0
    try:
        choice, mean_bits, pred = allocate(sens, bits, args.budget)
    except ValueError as e:
        return report_error(e)
    comm = comm_string(choice, row_parallel_sites(num_layers))
    SiteCodecs(parse_comm(comm), num_layers=num_layers)   # it must parse and resolve
    print(comm)
    print(f"mean bits/value {mean_bits:.4f}, predicted KL (sum of single-site KLs) "
          f"{pred:.4f}", file=sys.stderr)
    if args.out:
        doc = {"ckpt": args.ckpt, "tp": args.tp, "codecs": codecs, "bits": bits,
               "budget": args.budget, "windows": None if args.from_json else len(windows),
               "seq_len": args.seq_len, "kl": sens, "choice": choice, "comm": comm,
               "mean_bits": mean_bits, "predicted_kl": pred}
        atomic_write(args.out, (json.dumps(doc, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
