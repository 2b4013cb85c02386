"""Calibrate the calibrated codecs: per-channel statistics of every row-parallel partial sum.

    python tools/calibrate.py --ckpt DIR --text FILE --tp N --out calib.safetensors
    python tools/calibrate.py --ckpt DIR --text python-docs --tp N --out calib.safetensors
    torchrun --nproc_per_node=N tools/calibrate.py --ckpt DIR --text FILE --tp N --out F

Runs --num-seqs windows of --seq-len tokens of --text through the model at TP N
(simulated in one process unless launched by torchrun; communication uncompressed),
records for every all-reduce site the EMA (--decay) of each rank's per-channel min / max
of its partial sum and of the reduced sum (megatron_lite/lab/calibration.py), then picks
the --k (default hidden/64) widest channels per site as bf16 outliers and writes static
int4 steps for the rest (megatron_lite/comm/calibration.py: safetensors + a JSON header
naming the model, its fingerprint, TP, k and the text). --skip-seqs skips leading
windows, e.g. to keep calibration text disjoint from the windows tools/evaluate.py scores.

--text python-docs is a text every machine has: English prose from the docstrings of
this Python's standard library (megatron_lite/lab/eval/pydocs.py); the file records the
Python version, since the text depends on it.

Channel scales for the weighted- codecs (megatron_lite/comm/codecs/weighted.py): the
first --scale-seqs of those windows also run through the model at TP 1 with autograd,
which measures every row-parallel output's per-channel RMS and diagonal Fisher; the file
then carries s_c = F_c^(1/4) / rms_c^(1/2) per site. They depend on the model only, so
this needs an HF directory (a shard directory holds one TP size's shards): with a shard
directory the default is --scale-seqs 0, and then the file has no channel scales.

Tables for the klt codecs (--transform; megatron_lite/comm/codecs/klt.py): the first
pass also sums, per site and rank, the second moment of the partial sums; with the
Fisher from the channel-scale pass every rank gets its basis, and a second pass over
--transform-seqs windows measures the coded error of every coefficient group at 0-8
bits. Simulated TP only (the second pass needs the TP-1 Fisher in the same process).
The file grows by W x H x H fp32 per site (236 MB for Gemma-3-270M at TP 4).
"""
from __future__ import annotations

import datetime
import sys

from megatron_lite.cli.common import (TEXT_HELP, UsageError, check_output, check_text_source,
                                      fail, make_parser, rank_and_world, text_meta)
from megatron_lite.errors import MegatronLiteError


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--ckpt", required=True, metavar="DIR",
                   help="HF directory or shard directory (its TP == --tp)")
    p.add_argument("--text", required=True, metavar="FILE", help=TEXT_HELP)
    p.add_argument("--tp", type=int,
                   help="TP size, >= 2 (default: torchrun's WORLD_SIZE; required without "
                        "torchrun)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="calibration file to write (.safetensors)")
    p.add_argument("--num-seqs", type=int, default=128, metavar="N", help="windows of text")
    p.add_argument("--seq-len", type=int, default=512, metavar="N", help="tokens per window")
    p.add_argument("--skip-seqs", type=int, default=0, metavar="N",
                   help="leading windows of the text to skip")
    p.add_argument("--k", type=int,
                   help="outlier channels per site, rounded up to a multiple of TP "
                        "(default: hidden/64)")
    p.add_argument("--decay", type=float, default=0.9, help="EMA decay per sequence, in [0, 1)")
    p.add_argument("--batch-size", type=int, default=2, metavar="N",
                   help="sequences per forward")
    p.add_argument("--scale-seqs", type=int, default=None, metavar="N",
                   help="windows for the weighted- codecs' channel scales, 0 = none "
                        "(default: min(32, --num-seqs) with an HF directory, 0 with a "
                        "shard directory)")
    p.add_argument("--transform", action="store_true",
                   help="also write the klt codecs' tables: per-rank bases of the partial "
                        "sums and their coefficient-group error tables (needs the HF "
                        "checkpoint: the bases are Fisher-weighted; comm/codecs/klt.py)")
    p.add_argument("--transform-seqs", type=int, default=None, metavar="N",
                   help="windows for the klt error tables; the bases use --num-seqs "
                        "(default: min(8, --num-seqs))")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def check_flags(args, world) -> int:
    """The flags that need nothing but themselves; returns the TP size."""
    tp = args.tp if args.tp is not None else world
    if tp is None:
        raise UsageError("--tp is required without torchrun (outliers are per TP size)")
    if world is not None and tp != world:
        raise UsageError(f"--tp {tp} but torchrun started {world} ranks")
    if tp < 2:
        raise UsageError(f"--tp {tp}: TP 1 has no all-reduce to calibrate")
    for name in ("num_seqs", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got "
                             f"{getattr(args, name)}")
    if args.skip_seqs < 0:
        raise UsageError(f"--skip-seqs must be >= 0, got {args.skip_seqs}")
    if not 0.0 <= args.decay < 1.0:
        raise UsageError(f"--decay must be in [0, 1), got {args.decay}")
    if args.k is not None and args.k < 1:
        raise UsageError(f"--k must be >= 1, got {args.k}")
    if args.transform and world is not None:
        raise UsageError("--transform runs in simulated TP (run without torchrun): its "
                         "second pass needs the TP-1 Fisher in the same process")
    check_text_source(args.text)
    check_output(args.out, "--out")
    return tp


def prepare(args, tp: int):
    """Check the checkpoint and the text against each other; returns (hf_config, k,
    windows). Fills the defaults of --scale-seqs and --transform-seqs."""
    from transformers import AutoTokenizer

    from megatron_lite.checkpoint.loader import inspect_checkpoint
    from megatron_lite.lab.calibration import balanced_k
    from megatron_lite.lab.eval.data import load_text_windows
    from megatron_lite.models.config import ModelConfig

    hf_config, is_shards = inspect_checkpoint(args.ckpt, tp)
    if args.scale_seqs is None:
        args.scale_seqs = 0 if is_shards else min(32, args.num_seqs)
    if args.scale_seqs < 0:
        raise UsageError(f"--scale-seqs must be >= 0, got {args.scale_seqs}")
    if args.scale_seqs > args.num_seqs:
        raise UsageError(f"--scale-seqs {args.scale_seqs} > --num-seqs {args.num_seqs}")
    if args.transform and not args.scale_seqs:
        raise UsageError("--transform needs channel statistics (the HF checkpoint and "
                         "--scale-seqs > 0)")
    if args.transform_seqs is None:
        args.transform_seqs = min(8, args.num_seqs)
    if args.transform and not 1 <= args.transform_seqs <= args.num_seqs:
        raise UsageError(f"--transform-seqs must be in [1, --num-seqs], got "
                         f"{args.transform_seqs}")
    if args.scale_seqs and is_shards:
        raise UsageError("channel scales (--scale-seqs) need the HF checkpoint directory, "
                         "not a shard directory; or pass --scale-seqs 0")
    cfg = ModelConfig.from_hf(hf_config)
    k = args.k if args.k is not None else cfg.hidden_size // 64
    if k < 1:
        raise UsageError(f"--k must be >= 1, got {k} (hidden/64 of this model)")
    try:
        balanced_k(k, cfg.hidden_size, tp)                 # k must leave int4 channels
    except MegatronLiteError as e:
        raise UsageError(f"--k {k}: {e}") from None
    if args.seq_len > cfg.max_position_embeddings:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's "
                         f"{cfg.max_position_embeddings} positions")
    tok = AutoTokenizer.from_pretrained(args.ckpt)
    want = args.skip_seqs + args.num_seqs
    tw = load_text_windows(tok, args.text, args.seq_len, want * (args.seq_len - 1))
    if len(tw.windows) < want:
        raise UsageError(f"--text {args.text} has {len(tw.windows)} windows of "
                         f"{args.seq_len} tokens; --skip-seqs + --num-seqs needs {want}")
    return hf_config, k, tw.windows[args.skip_seqs:want]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_lite.lab.eval.runner import torchrun_world_size
    world = torchrun_world_size()
    rank, _ = rank_and_world()
    try:
        tp = check_flags(args, world)
        hf_config, k, windows = prepare(args, tp)
    except (MegatronLiteError, ValueError, OSError) as e:
        return fail(e)

    import torch
    from tqdm import tqdm

    from megatron_lite.comm.calibration import model_fingerprint
    from megatron_lite.lab.calibration import (ChannelStats, RecordingCommunicator,
                                               build_calibration)
    from megatron_lite.lab.eval.runner import launch, load_rank_engine, rank_logits
    from megatron_lite.lab.eval.study import model_name
    from megatron_lite.lab.transform import TransformRecorder, TransformStats

    stats = ChannelStats(tp, args.decay)   # shared by simulated ranks; per process otherwise
    tstats = TransformStats(tp) if args.transform else None

    def record(wrap, wins, desc, merge):
        def rank_main(comm):
            engine = load_rank_engine(args.ckpt, wrap(comm))
            bs = args.batch_size
            bar = tqdm(total=len(wins), unit="seq", desc=desc, dynamic_ncols=True,
                       disable=args.no_progress or comm.rank != 0)
            for lo in range(0, len(wins), bs):
                ids = torch.tensor([w.ids for w in wins[lo:lo + bs]])
                # Only the decoder's reduces matter: the LM head runs on one row per sequence.
                rank_logits(engine, ids, torch.full((ids.shape[0], 1), ids.shape[1] - 1))
                bar.update(ids.shape[0])
            bar.close()
            if world is not None:
                merge(comm)
            return None
        launch(rank_main, tp, simulated=world is None)

    def both(comm):
        rec = RecordingCommunicator(comm, stats)
        return rec if tstats is None else TransformRecorder(rec, tstats)

    record(both, windows, "calibrate", stats.merge_ranks)   # torchrun: --transform refused
    if rank != 0:
        return 0
    scales, scale_meta, fisher = {}, None, None
    if args.scale_seqs:
        scales, scale_meta, fisher = channel_scales(args, windows)
    if tstats is not None:
        # Pass 2 needs the bases, which need the Fisher (measured above at TP 1).
        tstats.make_bases(fisher)
        record(lambda comm: TransformRecorder(comm, tstats), windows[:args.transform_seqs],
               "klt tables", None)
    calib = build_calibration(
        stats.as_dict(), k=k, tp=tp, model=model_name(args.ckpt, hf_config),
        fingerprint=model_fingerprint(hf_config),
        extra={"num_seqs": len(windows), "seq_len": args.seq_len, "skip_seqs": args.skip_seqs,
               "decay": args.decay, **text_meta(args.text),
               "date": datetime.date.today().isoformat()})
    for site, sc in calib.sites.items():
        sc.channel_scale = scales.get(site)
        if tstats is not None and site in tstats.bases:
            (sc.klt_weight, sc.klt_basis, sc.klt_errors,
             sc.klt_loss_scale) = tstats.tables(site)
    if tstats is not None:
        calib.meta["transform"] = {"num_seqs": len(windows), "table_seqs": args.transform_seqs,
                                   "groups": sorted(next(iter(tstats.errors.values())))}
    if scale_meta:
        calib.meta["channel_scales"] = scale_meta
    calib.save(args.out)
    print(f"wrote {args.out}: {len(calib.sites)} sites, k = {calib.k_per_rank * tp} "
          f"({calib.k_per_rank} per rank) of hidden {calib.hidden}, TP {tp}, "
          f"{len(windows)} x {args.seq_len} tokens"
          + (f"; channel scales from {scale_meta['num_seqs']} windows" if scale_meta else
             "; no channel scales"), file=sys.stderr)
    return 0


def channel_scales(args, windows):
    """The weighted- codecs' channel scales from the first --scale-seqs windows at TP 1:
    ``(scales by site, metadata, Fisher)``."""
    import torch
    from tqdm import tqdm

    from megatron_lite.comm.communicator import Communicator
    from megatron_lite.lab.calibration import (EXPONENTS, channel_statistics,
                                               scales_from_statistics)
    from megatron_lite.lab.eval.runner import load_rank_engine
    model = load_rank_engine(args.ckpt, Communicator(0, 1)).model
    sw = windows[:args.scale_seqs]
    bar = tqdm(total=len(sw), unit="seq", desc="channel scales", dynamic_ncols=True,
               disable=args.no_progress)
    bs = args.batch_size
    rms, fisher, ntok = channel_statistics(
        model, (torch.tensor([w.ids for w in sw[lo:lo + bs]]) for lo in range(0, len(sw), bs)),
        progress=bar.update)
    bar.close()
    del model
    meta = {"exponents": list(EXPONENTS), "num_seqs": len(sw), "tokens": ntok}
    return scales_from_statistics(rms, fisher), meta, fisher
