"""GPU kernels for megatron_lite (Triton first), installed as ``megatron_lite.kernels``.

The quantize / dequantize / fused all-reduce kernels live here; each is tested against the
plain-torch reference codecs in ``megatron_lite.comm.codecs`` (the bit-exact contract).
"""
