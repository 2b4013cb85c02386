"""hadamard-<codec>: the rotation, the codec round trip and the two-step all-reduce."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_lite.comm.algorithms import two_step_all_reduce
from megatron_lite.comm.build import build_communicator
from megatron_lite.comm.codecs import CodecError, codec_bits, get_scheme, names, parse_codec_spec
from megatron_lite.comm.codecs.hadamard import fwht
from megatron_lite.comm.simulate import run_simulated
from tests._dist import run_distributed


def hadamard_matrix(g):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < g:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(g)


@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_fwht_is_the_normalised_hadamard_matrix_and_its_own_inverse(g):
    torch.manual_seed(g)
    x = torch.randn(3, 2 * g)
    want = (x.double().view(3, 2, g) @ hadamard_matrix(g)).view(3, 2 * g)
    y = fwht(x, g)
    assert torch.allclose(y.double(), want, atol=1e-5)
    assert torch.allclose(fwht(y, g), x, atol=1e-5)
    # A single spike spreads evenly: every rotated value has magnitude |spike| / sqrt(g).
    spike = torch.zeros(g)
    spike[7] = 10.0
    assert torch.allclose(fwht(spike, g).abs(), torch.full((g,), 10.0 / math.sqrt(g)))


def test_specs_bits_and_bad_input():
    assert "hadamard-int4" in names() and "hadamard-int4-int8" in names()
    assert get_scheme("hadamard-int4-int8:64").traits.two_stage
    assert codec_bits("hadamard-int4:128") == 4.25
    assert codec_bits("hadamard-int3:64") == codec_bits("int3:64")
    assert codec_bits("hadamard-int4-int8:128") == codec_bits("int4-int8:128")
    assert str(parse_codec_spec("hadamard-int4")) == "hadamard-int4:128"
    with pytest.raises(CodecError, match="does not fit"):
        parse_codec_spec("hadamard-int4:100")
    with pytest.raises(CodecError, match="unknown codec"):
        parse_codec_spec("hadamard-bf16")
    with pytest.raises(CodecError, match="power-of-two"):
        fwht(torch.zeros(96), 96)


def _one_rank(comm, spec, parts):
    return two_step_all_reduce(comm, parts[comm.rank], get_scheme(spec))


def _real(rank, world_size, spec, parts):
    from megatron_lite.comm.communicator import DistCommunicator
    return _one_rank(DistCommunicator(), spec, parts)


@pytest.mark.parametrize("spec", ["hadamard-int4:128", "hadamard-int4-int8:32"])
def test_two_step_matches_gloo_bitwise_and_beats_plain_on_spiky_data(spec):
    torch.manual_seed(0)
    w, t, h = 3, 5, 256
    parts = torch.randn(w, t, h)
    parts[:, :, 17] *= 40.0                      # one spiky channel per token
    sim = run_simulated(_one_rank, w, spec, parts)
    real = run_distributed(_real, w, spec, parts)
    for y in sim[1:] + real:
        assert torch.equal(y, sim[0])            # ranks identical, simulation == gloo
    exact = parts.sum(0)
    err_rot = (sim[0] - exact).pow(2).mean().sqrt()
    plain = run_simulated(_one_rank, w, spec.replace("hadamard-", ""), parts)[0]
    err_plain = (plain - exact).pow(2).mean().sqrt()
    assert err_rot < 0.5 * err_plain, (err_rot, err_plain)


def test_codec_error_bound_and_non_finite_groups():
    torch.manual_seed(1)
    sch = get_scheme("hadamard-int4:64")
    x = torch.randn(2, 256) * torch.logspace(-3, 3, 256)
    chunks, restore = sch.chunk(x, 2)
    enc = sch.rs_encode(chunks, 0)
    rot = sch.rs_decode(enc, 0, chunks.shape[-1])
    y = torch.stack([sch.ag_decode(sch.ag_encode(rot[j], j).unsqueeze(0), chunks.shape[-1],
                                   torch.float32)[0] for j in range(2)])
    err = (y - chunks).abs()
    # rs stage bound (the ag stage re-quantizes an already rounded value: add its bound)
    bound = sch.rs_error_bound(chunks, 0) + torch.stack(
        [sch.ag_error_bound(rot[j], j) for j in range(2)])
    assert (err <= bound).all()
    bad = chunks.clone()
    bad[0, 3] = float("inf")
    out = sch.ag_decode(sch.ag_encode(sch.rs_decode(sch.rs_encode(bad, 0), 0, bad.shape[-1])[0],
                                      0).unsqueeze(0), bad.shape[-1], torch.float32)[0]
    assert out[:64].isnan().all() and out[64:].isfinite().all()


def test_fused_kernels_serve_the_rotated_codec_through_its_maps():
    """The fused kernels take a rotated codec as its plain inner codec between the
    rotations of kernels/maps.py (bit-exactness: tests/test_kernels_interpret.py), never
    as the inner codec alone (that would silently skip the rotation)."""
    plain = get_scheme("int4:128").kernel_plan(torch.zeros(256))
    rot = get_scheme("hadamard-int4:128").kernel_plan(torch.zeros(256))
    assert (plain.rot, plain.scale) == (None, None) and not plain.mapped
    assert (rot.rot, rot.scale, rot.rs, rot.ag) == (128, None, plain.rs, plain.ag) and rot.mapped
    assert rot.rs == get_scheme("int4:128").rs.kernel_codec()


def test_quantized_communicator_routes_hadamard_codec():
    def fn(comm, parts):
        q = build_communicator(comm, "int8,layers.0.*=hadamard-int4:32")
        return (q.all_reduce(parts[comm.rank], "layers.0.mlp.down_proj"),
                q.explain(parts[comm.rank], "layers.0.mlp.down_proj"))
    parts = torch.randn(2, 4, 64)
    (y, why), _ = run_simulated(fn, 2, parts)
    assert "hadamard-int4:32" in why
    assert (y - parts.sum(0)).abs().max() < 0.5
