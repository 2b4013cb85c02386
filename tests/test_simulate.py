"""Simulated TP (megatron_lite/comm/simulate.py): the thread communicator's primitives,
failure handling (no hangs), and a whole TP model run on simulated ranks equal bit for bit
to the same model on real gloo ranks, for several comm configs."""
import threading
import time

import pytest
import torch

from megatron_lite.comm.build import build_communicator
from megatron_lite.comm.communicator import DistCommunicator
from megatron_lite.lab.calibration import build_calibration
from megatron_lite.comm.simulate import SimulationError, run_simulated
from tests._dist import run_distributed


# ----------------------------------------------------------------------------- primitives
def _primitives(comm):
    r, w = comm.rank, comm.world_size
    x = torch.arange(6, dtype=torch.float32).view(2, 3) + 10 * r
    gathered0 = comm.all_gather(x, dim=0)
    gathered1 = comm.all_gather(x, dim=-1)
    send = torch.arange(w * 2, dtype=torch.int32) + 100 * r      # chunk j = [2j, 2j+1] + 100r
    recv = torch.empty_like(send)
    comm.all_to_all_single(recv, send)
    out = torch.empty(w * 3, dtype=torch.uint8)
    comm.all_gather_into_tensor(out, torch.full((3,), r, dtype=torch.uint8))
    vals = torch.tensor([0.1, 1e8, -1e8, 3.0], dtype=torch.bfloat16) * (r + 1)
    summed = comm.all_reduce(vals)
    comm.barrier()
    return gathered0, gathered1, recv, out, summed, vals


@pytest.mark.parametrize("world", [1, 2, 3])
def test_thread_primitives(world):
    res = run_simulated(_primitives, world)
    xs = [torch.arange(6, dtype=torch.float32).view(2, 3) + 10 * r for r in range(world)]
    for r, (g0, g1, recv, out, summed, _) in enumerate(res):
        assert torch.equal(g0, torch.cat(xs, 0)) and torch.equal(g1, torch.cat(xs, -1))
        expect = torch.tensor([v for s in range(world) for v in (2 * r + 100 * s,
                                                                 2 * r + 1 + 100 * s)],
                              dtype=torch.int32)
        assert torch.equal(recv, expect)
        assert out.tolist() == [s for s in range(world) for _ in range(3)]
        acc = res[0][5].float().clone()
        for s in range(1, world):
            acc += res[s][5].float()
        assert torch.equal(summed, acc.to(torch.bfloat16))   # fp32 sum in rank order


# ----------------------------------------------------------------------------- failures
def _fails_on_rank1(comm):
    if comm.rank == 1:
        raise ValueError("boom on rank 1")
    comm.barrier()
    return comm.all_reduce(torch.ones(3))


def test_exception_propagates_without_hang():
    t0 = time.time()
    with pytest.raises(SimulationError, match="rank 1 failed: ValueError: boom on rank 1"):
        run_simulated(_fails_on_rank1, 4)
    assert time.time() - t0 < 10


def _bad_output_size(comm):
    out = torch.empty(comm.world_size * (3 if comm.rank == 0 else 2))
    comm.all_gather_into_tensor(out, torch.ones(2))
    return out


def test_error_inside_collective_aborts_all():
    with pytest.raises(SimulationError, match="rank 0 failed"):
        run_simulated(_bad_output_size, 2)


def _skips_collective(comm):
    if comm.rank == 0:
        return "left early"
    return comm.all_reduce(torch.ones(2))


def test_missing_rank_times_out():
    t0 = time.time()
    with pytest.raises(SimulationError):
        run_simulated(_skips_collective, 2, timeout=1.0)
    assert time.time() - t0 < 30


def _slow_but_steady(comm):
    total = torch.zeros(2)
    for _ in range(4):
        time.sleep(0.3)  # every rank works 0.3 s between collectives: waits stay short
        total += comm.all_reduce(torch.ones(2))
    return total


def test_run_may_outlast_timeout():
    # ``timeout`` bounds one wait at a collective, not the run (a long evaluation must
    # not be killed for being long).
    t0 = time.time()
    out = run_simulated(_slow_but_steady, 2, timeout=0.5)
    assert time.time() - t0 > 1.0
    assert all(torch.equal(o, torch.full((2,), 8.0)) for o in out)


def _stuck_outside_collective(comm):
    if comm.rank == 0:
        threading.Event().wait(30.0)  # never reaches the collective
        return None
    return comm.all_reduce(torch.ones(2))


def test_rank_stuck_outside_collective_is_given_up_on():
    t0 = time.time()
    with pytest.raises(SimulationError, match="sim-rank0 did not stop within 1 s"):
        run_simulated(_stuck_outside_collective, 2, timeout=1.0)
    assert time.time() - t0 < 10


def test_thread_count_restored():
    before = torch.get_num_threads()
    seen = run_simulated(lambda comm: torch.get_num_threads(), 2, num_threads=1)
    assert seen == [1, 1] and torch.get_num_threads() == before


# ----------------------------------------------------------------------------- a whole model
MODEL_SPECS = ["bf16", "int4:32", "int4-int8:64,layers.0.*=int8,embed_tokens=int8",
               "int2:32", "int8:32", "outlier-int4"]


def _model_inputs(name):
    from tests.tiny_configs import hf_config_dict, make_hf_model
    model = make_hf_model(name)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(5))
    return hf_config_dict(name), sd, ids


def _model_calibration(hf_cfg, world, path):
    h, n = hf_cfg["hidden_size"], hf_cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(world)
    stats = {}
    for i in range(n):
        for site in (f"layers.{i}.self_attn.o_proj", f"layers.{i}.mlp.down_proj"):
            rs = 1.0 + 4 * torch.rand(world, h, generator=g)
            ag = rs.amax(0) * world ** 0.5
            stats[site] = {"rs_min": -rs, "rs_max": rs, "ag_min": -ag, "ag_max": ag}
    build_calibration(stats, k=2, tp=world, model="tiny", fingerprint="tiny").save(path)
    return path


def _model_logits(comm, hf_cfg, sd, ids, calib, dtype):
    from megatron_lite.inference.engine import Engine
    out = []
    for spec in MODEL_SPECS:
        qc = build_communicator(comm, spec, calibration=calib if "outlier" in spec else None,
                                num_layers=hf_cfg["num_hidden_layers"])
        eng = Engine.from_hf_state_dict(hf_cfg, sd, comm=qc, dtype=dtype, device="cpu")
        with torch.no_grad():
            out.append(eng.logits(ids).float())
    return out


def _dist_model_logits(rank, world, hf_cfg, sd, ids, calib, dtype):
    comm = DistCommunicator()
    return [t.numpy() for t in _model_logits(comm, hf_cfg, sd, ids, calib, dtype)]


@pytest.mark.parametrize("name,world,dtype", [("llama", 2, torch.float32),
                                              ("gemma3_text", 4, torch.bfloat16)])
def test_simulated_model_equals_real_ranks(name, world, dtype, tmp_path):
    hf_cfg, sd, ids = _model_inputs(name)
    calib = _model_calibration(hf_cfg, world, str(tmp_path / "calib.safetensors"))
    real = run_distributed(_dist_model_logits, world, hf_cfg, sd, ids, calib, dtype)
    sim = run_simulated(_model_logits, world, hf_cfg, sd, ids, calib, dtype)
    for k, spec in enumerate(MODEL_SPECS):
        ref = torch.from_numpy(real[0][k])
        assert torch.isfinite(ref).all(), spec
        for r in range(world):
            assert torch.equal(torch.from_numpy(real[r][k]), ref), (spec, "ranks differ")
            assert torch.equal(sim[r][k], ref), (spec, "simulation differs from gloo")
    # The codec really is in the reduce path: int2 moves logits more than int8 does.
    base = sim[0][0]
    d8 = (sim[0][MODEL_SPECS.index("int8:32")] - base).abs().max().item()
    d2 = (sim[0][MODEL_SPECS.index("int2:32")] - base).abs().max().item()
    assert 0 < d8 < d2
