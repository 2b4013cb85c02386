import faulthandler, sys, time
sys.path.insert(0, ".")

def wrapped(rank, world):
    faulthandler.dump_traceback_later(100, repeat=True, file=sys.stderr)
    import tests.gpu.test_generate_gpu as t
    orig = t._engine
    def eng(*a, **k):
        e = orig(*a, **k)
        g = e.generate
        def gen(*aa, **kk):
            print(f"[rank{rank} {time.time():.0f}] generate graphs={e.cuda_graphs} comm={type(e.group.communicator).__name__}", file=sys.stderr, flush=True)
            r = g(*aa, **kk)
            print(f"[rank{rank} {time.time():.0f}] done", file=sys.stderr, flush=True)
            return r
        e.generate = gen
        return e
    t._engine = eng
    return t._tp2_graphs(rank, world)

if __name__ == "__main__":
    from tests.gpu._harness import run_nccl
    r = run_nccl(wrapped, 2, timeout=280)
    print("FINISHED", {k: (v["graphed"] == v["eager"], v["captured"]) for k, v in r[0].items()})
