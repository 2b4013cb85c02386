"""Pick the two-shot kernel's data movement (push / pull) and grid density (blocks per SM)
on this machine; prints BEST=<mode>,<bpsm>.

    MEGATRON_LITE_PACK=split torchrun --nproc_per_node=4 tests/gpu/sweep_grid.py
Times the fused kernel (CUDA-graph replays, median of 30) for a few codecs and sizes at
1, 2 and 4 blocks per SM, pushing and pulling; the grid size is a host-side choice and the
mode a compile-time one read per call. The sub-byte packing (MEGATRON_LITE_PACK) is fixed
per process. Before timing, every mode's and grid's output is checked bitwise against the
first one's. SWEEP_MODES, SWEEP_CODECS, SWEEP_SIZES_MB and SWEEP_BPSM narrow the grid.
"""
import math
import os
import statistics
import sys

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    from tests.gpu._harness import import_kernels
    k = import_kernels()
    from megatron_lite.comm.codecs import get_codec
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank = dist.get_rank()
    state = k.backends.make_state(None, max_bytes=256 << 20, oneshot_max_bytes=1 << 20)
    ws, fa = state.ws, k.fused_allreduce
    # SWEEP_* narrow the sweep when device time is short.
    codecs = [get_codec(c) for c in os.environ.get("SWEEP_CODECS",
                                                   "int4:128,int8:128,bf16").split(",")]
    sizes = [int(m) << 20 for m in os.environ.get("SWEEP_SIZES_MB", "8,64,128").split(",")]
    bpsms = [int(b) for b in os.environ.get("SWEEP_BPSM", "1,2,4").split(",")]
    modes = os.environ.get("SWEEP_MODES", "push,pull").split(",")
    for mode in modes:
        os.environ["MEGATRON_LITE_TWO_SHOT"] = mode
        fa.prewarm(ws, codecs, [s // 2 for s in sizes], oneshot=False)
    res, same = {}, {}
    for c in codecs:
        for s in sizes:
            x = torch.randn(s // 2, device="cuda", generator=torch.Generator("cuda").manual_seed(
                s + rank)).bfloat16()
            outs = {}
            for mode in modes:
                os.environ["MEGATRON_LITE_TWO_SHOT"] = mode
                for bpsm in bpsms:
                    os.environ["MEGATRON_LITE_BLOCKS_PER_SM"] = str(bpsm)
                    outs[mode, bpsm] = fa.two_shot_all_reduce(ws, x, c).clone()
            ref = next(iter(outs.values())).view(torch.int16)
            same[(c.spec, s)] = all(torch.equal(ref, o.view(torch.int16)) for o in outs.values())
    if rank == 0:
        print(f"rank 0: every mode and grid bitwise equal: {same}", flush=True)
    for mode in modes:
        os.environ["MEGATRON_LITE_TWO_SHOT"] = mode
        for bpsm in bpsms:
            os.environ["MEGATRON_LITE_BLOCKS_PER_SM"] = str(bpsm)
            for c in codecs:
                for s in sizes:
                    x = torch.randn(s // 2, device="cuda").bfloat16()
                    for _ in range(2):
                        fa.two_shot_all_reduce(ws, x, c)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        fa.two_shot_all_reduce(ws, x, c)
                    ts = []
                    for _ in range(30):
                        a, b = (torch.cuda.Event(enable_timing=True),
                                torch.cuda.Event(enable_timing=True))
                        a.record(); g.replay(); b.record()
                        torch.cuda.synchronize()
                        ts.append(a.elapsed_time(b) * 1e3)
                    t = torch.tensor([statistics.median(ts)], device="cuda")
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    res[(mode, bpsm, c.spec, s)] = t.item()
                    if rank == 0:   # as it goes: a run cut short still reports
                        print(f"{mode} bpsm={bpsm} {c.spec:>9} {s >> 20:4d}MB {t.item():9.1f} us",
                              flush=True)
    ws.check()
    flags = torch.tensor([int(all(same.values()))], device="cuda")
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if rank == 0:
        pack = os.environ.get("MEGATRON_LITE_PACK", "split")
        print(f"pack={pack} world={dist.get_world_size()} pull==push and every grid "
              f"bitwise on every rank: "
              f"{bool(flags.item())} {same if not flags.item() else ''}")
        for key, us in sorted(res.items()):
            print(f"pack={pack} {key[0]} bpsm={key[1]} {key[2]:>9} {key[3] >> 20:4d}MB "
                  f"{us:9.1f} us")
        keys = sorted({k[:2] for k in res})
        score = {k: math.exp(statistics.mean(math.log(res[k + (c.spec, s)])
                                             for c in codecs for s in sizes)) for k in keys}
        print("geomean us:", {f"{m},{b}": round(v, 1) for (m, b), v in score.items()})
        best = min(score, key=score.get)
        print(f"BEST={best[0]},{best[1]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
