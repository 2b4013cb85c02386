"""Run a test body on N real ranks (one process each) and collect the results.

``run_distributed(fn, world_size, *args, backend="gloo")`` spawns ``world_size`` processes
that join a gloo group (or, with ``backend="nccl"``, an NCCL group, rank r on GPU r) through
a file store, call ``fn(rank, world_size, *args)`` and send back its
(picklable) return value. Any rank's exception fails the caller with that rank's
traceback. ``fn`` must be a module-level function (it is pickled by reference).
"""
from __future__ import annotations

import os
import pickle
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, init_file, fn, args, queue, backend):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        kwargs = {}
        if backend == "nccl":
            # NVLink multicast stays off on the shared GPU hosts (device tool's KINDS.md).
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
            os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}",
                                rank=rank, world_size=world_size, **kwargs)
        result = fn(rank, world_size, *args)
        # Plain pickle copies tensor bytes. The queue's own (torch) pickler would pass shared
        # memory by file descriptor, served by this process: if it exits before the parent
        # unpickles, the parent fails with FileNotFoundError (rebuild_storage_fd race).
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "err", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            # Free what the body left behind (CUDA graphs that captured NCCL kernels, the
            # symmetric-memory workspace) before the communicator goes: with them alive,
            # destroy_process_group blocked forever on 2 x H200 after
            # test_tp2_graphs_over_nccl_and_fused_allreduce had returned its results.
            import gc
            gc.collect()
            if backend == "nccl":
                torch.cuda.synchronize()
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0,
                    backend: str = "gloo"):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, queue,
                                                     backend))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results, errors = {}, []
        for _ in range(world_size):
            rank, status, payload = queue.get()
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
        # Every rank has reported: what is left is teardown, which must not hold the
        # caller for the whole test timeout if it blocks.
        for p in procs:
            p.join(timeout=5 if errors else min(timeout, 120.0))
            if p.is_alive():
                p.kill()
        if errors:
            raise RuntimeError("distributed test failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
