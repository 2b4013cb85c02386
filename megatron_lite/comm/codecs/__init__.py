"""The codecs of the quantized all-reduce: wire formats (``Codec``) and how each one
all-reduces a message (``Scheme``), both declared in base.py; the name registry and the
one ``CODEC[:GROUP]`` parser in registry.py.

Every other module of this package is one codec family and registers its names when
imported; this package imports them all, so adding a codec is adding a module:

* group.py     bf16, int8, int5, int4, int4-sym, int3, int2, fp8, int4-int8 (bit-exact
               reference of every kernel; docs/codecs.md)
* hadamard.py  ``hadamard-CODEC``: block Hadamard rotation around a group codec
* weighted.py  ``weighted-CODEC``: calibrated channel scales around a group codec
* outlier.py   ``outlier-int4``: static outlier channels in bf16 (Low-bit TP)
* klt.py       ``kltN``: per-rank calibrated transform coding (one-shot only)
"""
import importlib
import pkgutil

from megatron_lite.comm.codecs.base import (BF16_MAX, DEFAULT_GROUP_SIZE, FP16_MAX,
                                            GROUP_SIZES, Codec, CodecError, CodecSpec,
                                            NoKernelError, Scheme, Traits, saturate)
from megatron_lite.comm.codecs.group import BF16Codec, GroupCodec, GroupScheme, get_codec
from megatron_lite.comm.codecs.registry import (codec_bits, get_scheme, names,
                                                parse_codec_spec, traits)

__all__ = ["BF16_MAX", "DEFAULT_GROUP_SIZE", "FP16_MAX", "GROUP_SIZES", "Codec", "CodecError",
           "CodecSpec", "NoKernelError", "Scheme", "Traits", "saturate", "codec_bits",
           "get_scheme", "names", "parse_codec_spec", "traits", "BF16Codec", "GroupCodec",
           "GroupScheme", "get_codec"]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module}")
