"""Profile target for Nsight Compute: the CUDA codec kernels once each on a 64 MB bf16
message in 4 chunks (int8:128 and hadamard-int4:128: quantize, dequantize,
dequantize-and-sum; the weighted- quantize of hadamard-int4:128 and hadamard-int6-sym:128,
with random channel scales of a 4096-wide model), so that `ncu` can say where their time
goes:

    ncu --clock-control none --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats -k regex:_kernel python3 tests/gpu/profile_codec.py
"""
import torch

from megatron_lite.comm.codecs import get_codec
from megatron_lite.kernels import codec_cuda as cc


def main():
    x = torch.randn(4, 8 << 20, device="cuda").to(torch.bfloat16)
    n = x.shape[-1]
    for spec, rot in (("int8:128", None), ("hadamard-int4:128", 128)):
        kc = get_codec(spec.replace("hadamard-", "")).kernel_codec()
        buf = cc.quantize(kc, x, rot=rot)
        cc.dequantize(kc, buf[0], n, torch.float32 if rot else torch.bfloat16, rot=rot)
        cc.dequantize(kc, buf, n, torch.float32, sum_rows=True, rot=rot)
    scale = torch.rand(4096, device="cuda") + 0.5
    for spec in ("int4:128", "int6-sym:128"):
        cc.quantize(get_codec(spec).kernel_codec(), x, rot=128, scale=scale)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
