"""Pick the two-shot grid density (blocks per SM) on this machine; prints BEST_BPSM=<n>.

    torchrun --nproc_per_node=4 tests/gpu/sweep_grid.py
Times the fused kernel (CUDA-graph replays, median of 30) for a few codecs and sizes at
1, 2 and 4 blocks per SM; the grid size is a host-side choice, so nothing recompiles.
"""
import math
import os
import statistics
import sys

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


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
    codecs = [get_codec(c) for c in ("int4:128", "int8:128", "bf16")]
    sizes = [8 << 20, 64 << 20, 256 << 20]
    fa.prewarm(ws, codecs, [s // 2 for s in sizes])
    res = {}
    for bpsm in (1, 2, 4):
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
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record(); g.replay(); b.record()
                    torch.cuda.synchronize()
                    ts.append(a.elapsed_time(b) * 1e3)
                t = torch.tensor([statistics.median(ts)], device="cuda")
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                res[(bpsm, c.spec, s)] = t.item()
    ws.check()
    if rank == 0:
        for key, us in sorted(res.items()):
            print(f"bpsm={key[0]} {key[1]:>9} {key[2] >> 20:4d}MB {us:9.1f} us")
        score = {b: math.exp(statistics.mean(math.log(res[(b, c.spec, s)]) for c in codecs for s in sizes))
                 for b in (1, 2, 4)}
        print("geomean us:", {b: round(v, 1) for b, v in score.items()})
        print(f"BEST_BPSM={min(score, key=score.get)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
