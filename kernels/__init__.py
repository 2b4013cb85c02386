"""GPU kernels for megatron_lite (Triton first), installed as ``megatron_lite.kernels``.

* ``quant``            quantize / dequantize(+sum) / error part for the group codecs of
                       ``megatron_lite.comm.codecs`` (all but int5), optionally around
                       a Hadamard rotation, bit-exact against that reference;
* ``workspace``        symmetric buffers (torch symmetric memory on CUDA, /dev/shm in tests)
                       with on-device epochs;
* ``fused_allreduce``  one-shot bf16 and one-launch two-shot quantized all-reduce kernels;
* ``maps``             the rotation / channel-scale maps around them for the ``hadamard-``
                       and ``weighted-`` codecs, bit-exact against comm/rotation.py and
                       comm/weighting.py;
* ``backends``         their Backend classes for comm/allreduce.py's chain, ``auto``, and
                       the one-shot backend (quantize, NCCL all-gather, dequantize-sum);
* ``thresholds``       the measured size table ``auto`` chooses by.

Importing this package needs ``triton``; ``megatron_lite.comm`` works without it.
"""
from . import quant, sync, workspace, fused_allreduce, maps, thresholds, backends  # noqa: F401
from .backends import AutoBackend, install_fused  # noqa: F401
