"""Profile target for Nsight Compute: the CUDA codec kernels once each on a 64 MB bf16
message in 4 chunks, so that `ncu` can say where their time goes:

    ncu --clock-control none --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats -k regex:_kernel python3 tests/gpu/profile_codec.py [SET]

SET ``quantize`` (default): int8:128 and hadamard-int4:128 quantize, dequantize and
dequantize-and-sum, and the weighted- quantize of hadamard-int4:128 and
hadamard-int6-sym:128 (random channel scales of a 4096-wide model). SET ``decode``: the
decode side of the plain and rotated codecs at G = 128 and 64 (dequantize to bf16 and
fp32, dequantize-and-sum, error part), the kernels that run below the copy's speed in
docs/results/codec_kernels.md. SET ``fused``: the two-shot all-reduce kernel at one rank
(a one-rank NCCL group and workspace; nothing crosses a link), 4 blocks per SM, for
int8:128, weighted-int8:128, hadamard-int8:128 and weighted-hadamard-int8:128 (scales of
a 4096-wide model): what the weighted- maps cost inside it (docs/notebook/2026-12-07.md).
SET ``fused4``: the same at 4 bits and 6 blocks per SM.
"""
import os
import sys

import torch

from megatron_lite.comm.codecs import get_codec
from megatron_lite.kernels import codec_cuda as cc


def _quantize_set(x: torch.Tensor) -> None:
    n = x.shape[-1]
    for spec, rot in (("int8:128", None), ("hadamard-int4:128", 128)):
        kc = get_codec(spec.replace("hadamard-", "")).kernel_codec()
        buf = cc.quantize(kc, x, rot=rot)
        cc.dequantize(kc, buf[0], n, torch.float32 if rot else torch.bfloat16, rot=rot)
        cc.dequantize(kc, buf, n, torch.float32, sum_rows=True, rot=rot)
    scale = torch.rand(4096, device="cuda") + 0.5
    for spec in ("int4:128", "int6-sym:128"):
        cc.quantize(get_codec(spec).kernel_codec(), x, rot=128, scale=scale)


def _decode_set(x: torch.Tensor) -> None:
    n = x.shape[-1]
    for spec, rot in (("int4:128", None), ("int4:64", None), ("int8:128", None),
                      ("int4:64", 64), ("int6-sym:128", 128)):
        kc = get_codec(spec).kernel_codec()
        buf = cc.quantize(kc, x, rot=rot)
        cc.dequantize(kc, buf, n, torch.float32 if rot else torch.bfloat16, rot=rot)
        cc.dequantize(kc, buf, n, torch.float32, sum_rows=True, rot=rot)
        cc.error_part(kc, x, buf, rot=rot)


def _fused_set(x: torch.Tensor, bits: int = 8, bpsm: int = 4) -> None:
    import torch.distributed as dist
    from megatron_lite.comm import fused as backends
    from megatron_lite.comm.codecs import CodecSpec, get_scheme
    from megatron_lite.comm.codecs.weighted import WeightedScheme
    from megatron_lite.kernels import fused_allreduce as fa
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"), ("RANK", "0"),
                 ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    dist.init_process_group("nccl")
    state = backends.make_state(None, max_bytes=x.numel() * x.element_size())
    assert state.ws is not None, state.why
    x = x.view(-1, 4096)
    scale = torch.rand(4096, generator=torch.Generator().manual_seed(3)) * 8 + 0.05
    for codec in (get_scheme(f"int{bits}:128"),
                  WeightedScheme(CodecSpec(f"weighted-int{bits}", 128), scale),
                  get_scheme(f"hadamard-int{bits}:128"),
                  WeightedScheme(CodecSpec(f"weighted-hadamard-int{bits}", 128), scale)):
        fa.two_shot_all_reduce(state.ws, x, codec.kernel_plan(x), bpsm=bpsm)
    torch.cuda.synchronize()
    assert int(state.ws.status[0]) == 0
    dist.destroy_process_group()


def main(which: str = "quantize") -> None:
    sets = {"quantize": _quantize_set, "decode": _decode_set, "fused": _fused_set,
            "fused4": lambda x: _fused_set(x, bits=4, bpsm=6)}
    if which not in sets:
        raise SystemExit(f"profile_codec.py: unknown set {which!r} (one of {sorted(sets)})")
    x = torch.randn(4, 8 << 20, device="cuda").to(torch.bfloat16)
    sets[which](x)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(*sys.argv[1:2])
