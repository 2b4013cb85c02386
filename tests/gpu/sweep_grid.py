"""Pick the two-shot kernel's grid density (blocks per SM) on this machine; prints
BEST=<bpsm>.

    torchrun --nproc_per_node=4 tests/gpu/sweep_grid.py

Times the fused kernel (CUDA-graph replays, median of 30) for a few codecs and sizes at
1, 2, 4 and 6 blocks per SM (the grid size is a host-side choice; the CUDA kernels hold
6 blocks per SM at once, csrc/peers.cuh's kTileBlocksPerSM). Before timing, every
grid's output is checked bitwise against the first one's. SWEEP_CODECS, SWEEP_SIZES_MB
and SWEEP_BPSM narrow the grid.
"""
import math
import os
import statistics

import torch
import torch.distributed as dist


def main():
    from tests.gpu._harness import import_kernels
    k = import_kernels()
    from megatron_lite.comm.codecs import get_scheme
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank = dist.get_rank()
    state = k.backends.make_state(None, max_bytes=256 << 20, oneshot_max_bytes=1 << 20)
    ws, fa = state.ws, k.fused_allreduce
    # SWEEP_* narrow the sweep when device time is short.
    specs = os.environ.get("SWEEP_CODECS", "int4:128,int8:128,bf16").split(",")
    plans = {s: get_scheme(s).kernel_plan(torch.zeros(1)) for s in specs}
    sizes = [int(m) << 20 for m in os.environ.get("SWEEP_SIZES_MB", "8,64,128").split(",")]
    bpsms = [int(b) for b in os.environ.get("SWEEP_BPSM", "1,2,4,6").split(",")]
    fa.prewarm(ws, list(plans.values()), [s // 2 for s in sizes], oneshot=False)
    res, same = {}, {}
    for spec, plan in plans.items():
        for s in sizes:
            x = torch.randn(s // 2, device="cuda", generator=torch.Generator("cuda").manual_seed(
                s + rank)).bfloat16()
            outs = {b: fa.two_shot_all_reduce(ws, x, plan, bpsm=b).clone() for b in bpsms}
            ref = next(iter(outs.values())).view(torch.int16)
            same[(spec, s)] = all(torch.equal(ref, o.view(torch.int16)) for o in outs.values())
    if rank == 0:
        print(f"rank 0: every grid bitwise equal: {same}", flush=True)
    for bpsm in bpsms:
        for spec, plan in plans.items():
            for s in sizes:
                x = torch.randn(s // 2, device="cuda").bfloat16()
                for _ in range(2):
                    fa.two_shot_all_reduce(ws, x, plan, bpsm=bpsm)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fa.two_shot_all_reduce(ws, x, plan, bpsm=bpsm)
                ts = []
                for _ in range(30):
                    a, b = (torch.cuda.Event(enable_timing=True),
                            torch.cuda.Event(enable_timing=True))
                    a.record()
                    g.replay()
                    b.record()
                    torch.cuda.synchronize()
                    ts.append(a.elapsed_time(b) * 1e3)
                t = torch.tensor([statistics.median(ts)], device="cuda")
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                res[(bpsm, spec, s)] = t.item()
                if rank == 0:   # as it goes: a run cut short still reports
                    print(f"bpsm={bpsm} {spec:>9} {s >> 20:4d}MB {t.item():9.1f} us", flush=True)
    ws.check()
    flags = torch.tensor([int(all(same.values()))], device="cuda")
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"world={dist.get_world_size()} every grid bitwise on every rank: "
              f"{bool(flags.item())} {same if not flags.item() else ''}")
        score = {b: math.exp(statistics.mean(math.log(res[(b, c, s)])
                                             for c in plans for s in sizes)) for b in bpsms}
        print("geomean us:", {b: round(v, 1) for b, v in score.items()})
        print(f"BEST={min(score, key=score.get)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
