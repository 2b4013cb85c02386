"""``build_communicator``: from a ``--comm`` spec to the communicator chain of one rank.

    base (DistCommunicator / ThreadCommunicator)
      <- QuantizedCommunicator (router.py: per-site scheme, cached plan, backend chain:
                                fused.py's kernel backends on NCCL, then the portable path)
        <- ErrorFeedbackCommunicator (feedback.py, for ``ef+``)
"""
from __future__ import annotations

from typing import Optional

from megatron_lite.comm.communicator import Communicator
from megatron_lite.comm.feedback import ErrorFeedbackCommunicator
from megatron_lite.comm.fused import install_fused_on_nccl
from megatron_lite.comm.router import QuantizedCommunicator
from megatron_lite.comm.spec import parse_comm


def build_communicator(base: Communicator, comm=None, calibration: Optional[str] = None,
                       num_layers: Optional[int] = None, hf_config: Optional[dict] = None,
                       max_bytes: int = 128 << 20) -> Communicator:
    """Wrap ``base`` for a comm setting: None or a native spec -> ``base`` unchanged; a
    ``--comm`` string or a CommSpec -> a QuantizedCommunicator (wrapped in error feedback
    for ``ef+``), with the fused kernel backends in front of its chain on an NCCL group.

    ``calibration`` (``--calibration``) fills the spec's file unless it names one;
    ``num_layers`` resolves ``layers.-1.*`` overrides; ``hf_config`` (the model's config
    dict) lets a calibration file be checked against the model; ``max_bytes``: the
    largest message the fused kernels' workspace takes. Collective on an NCCL group (the
    workspace is allocated on every rank).
    """
    spec = parse_comm(comm, calibration)
    if spec.is_native:
        return base
    qc = QuantizedCommunicator(base, spec, num_layers=num_layers, hf_config=hf_config)
    install_fused_on_nccl(qc, max_bytes)
    return ErrorFeedbackCommunicator(qc) if spec.error_feedback else qc
