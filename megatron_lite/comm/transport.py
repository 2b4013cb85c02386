"""How the ranks of a TP group reach each other: the transport the ``auto`` chooser's
table is picked by (kernels/thresholds.py).

* ``nvlink``       GPUs on one host with CUDA peer access (NVLink, or PCIe peer-to-peer):
                   NCCL and the fused kernels read and write peers' memory directly;
* ``host-memory``  GPUs on one host without peer access (PCIe boxes whose GPUs cannot
                   reach each other, or ``NCCL_P2P_DISABLE=1``): NCCL copies through
                   host shared memory;
* ``socket``       a network: ranks on several hosts, ``NCCL_SHM_DISABLE=1`` on top of
                   ``NCCL_P2P_DISABLE=1``, or a gloo group (CPU tensors over TCP, loopback
                   on one host);
* ``local``        one process: a single rank, or simulated ranks (threads).

:func:`detect_transport` decides, in this order: the group's backend (gloo -> socket),
the hosts of the ranks (an ``all_gather_object`` of hostnames: more than one -> socket),
the NCCL variables that ``--transport`` in the benchmark tools sets (NCCL reads them when
it creates its communicator), then CUDA peer access between every pair of the group's
GPUs (``torch.cuda.can_device_access_peer``, each rank checking its peers, the verdicts
gathered so that every rank decides the same). ``--comm ...,transport=T`` overrides it
(comm/spec.py); the override keeps the detected reason in its ``how``.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist


class Transport(str, Enum):
    NVLINK = "nvlink"
    HOST_MEMORY = "host-memory"
    SOCKET = "socket"
    LOCAL = "local"


# The transports ``--comm transport=T`` may name (``local`` is what a process is, not a link).
LINKS = (Transport.NVLINK, Transport.HOST_MEMORY, Transport.SOCKET)


@dataclass(frozen=True)
class TransportInfo:
    """A transport and how it was found (shown by ``explain``)."""

    transport: Transport
    how: str

    def __str__(self) -> str:
        return f"{self.transport.value} ({self.how})"


LOCAL_ONE_RANK = TransportInfo(Transport.LOCAL, "one rank: nothing crosses a link")


def _flag(environ: Mapping[str, str], key: str) -> bool:
    """NCCL reads these knobs as integers: any non-zero value switches the transport off."""
    value = environ.get(key, "").strip()
    return value.lstrip("-").isdigit() and int(value) != 0


def classify(backend: str, hosts: Sequence[str], peer_access: Optional[bool],
             no_peer: str = "", environ: Optional[Mapping[str, str]] = None) -> TransportInfo:
    """The transport of a group from what its ranks reported: ``backend`` (the process
    group's), every rank's hostname, whether every pair of its GPUs has CUDA peer access
    (None: not checked), ``no_peer`` (which pair has none) and the NCCL variables."""
    env = os.environ if environ is None else environ
    if backend != "nccl":
        return TransportInfo(Transport.SOCKET, f"{backend} process group: CPU tensors over "
                             "TCP, loopback on one host")
    if len(set(hosts)) > 1:
        return TransportInfo(Transport.SOCKET, f"ranks on {len(set(hosts))} hosts")
    p2p_off, shm_off = _flag(env, "NCCL_P2P_DISABLE"), _flag(env, "NCCL_SHM_DISABLE")
    if p2p_off:
        if shm_off:
            return TransportInfo(Transport.SOCKET, "NCCL_P2P_DISABLE and NCCL_SHM_DISABLE set")
        return TransportInfo(Transport.HOST_MEMORY, "NCCL_P2P_DISABLE set")
    if peer_access is False:
        why = f"no CUDA peer access{': ' + no_peer if no_peer else ''}"
        if shm_off:
            return TransportInfo(Transport.SOCKET, why + ", NCCL_SHM_DISABLE set")
        return TransportInfo(Transport.HOST_MEMORY, why)
    return TransportInfo(Transport.NVLINK, f"one host, CUDA peer access between all "
                         f"{len(hosts)} GPUs (NVLink or PCIe peer-to-peer)")


def _peer_verdict(devices: Sequence[str]) -> str:
    """'' if this rank's GPU can access every other rank's GPU, else the first pair that
    cannot (``devices``: every rank's GPU UUID, in rank order)."""
    me = torch.cuda.current_device()
    index = {str(torch.cuda.get_device_properties(i).uuid): i
             for i in range(torch.cuda.device_count())}
    for r, uuid in enumerate(devices):
        peer = index.get(uuid)
        if peer is None:
            return f"rank {r}'s GPU is not visible to GPU {me}"
        if peer != me and not torch.cuda.can_device_access_peer(me, peer):
            return f"GPU {me} cannot access GPU {peer}"
    return ""


def detect_transport(process_group=None,
                     environ: Optional[Mapping[str, str]] = None) -> TransportInfo:
    """The transport of ``process_group`` (module docstring). Collective on an NCCL group
    (two ``all_gather_object`` calls: every rank calls it at the same point); a gloo group
    or a single rank needs no message."""
    if not dist.is_initialized() or dist.get_world_size(process_group) == 1:
        return LOCAL_ONE_RANK
    backend = dist.get_backend(process_group)
    if backend != "nccl":
        return classify(backend, [], None, environ=environ)
    world = dist.get_world_size(process_group)
    facts = [None] * world
    me = (socket.gethostname(), str(torch.cuda.get_device_properties(
        torch.cuda.current_device()).uuid))
    dist.all_gather_object(facts, me, group=process_group)
    hosts = [h for h, _ in facts]
    if len(set(hosts)) > 1:
        return classify(backend, hosts, None, environ=environ)
    verdicts = [None] * world
    dist.all_gather_object(verdicts, _peer_verdict([d for _, d in facts]), group=process_group)
    missing = [v for v in verdicts if v]
    return classify(backend, hosts, not missing, missing[0] if missing else "", environ)

