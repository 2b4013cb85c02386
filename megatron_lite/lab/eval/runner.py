"""Run a model at tensor-parallel size N for evaluation and calibration: simulated (N
threads of one process, ``comm/simulate.py``) or real (one process per rank, torchrun).

Both modes hand each rank a Communicator and run the same rank function, so the tools
have one code path. Per rank:

* :class:`CodecSwitch` holds one communicator per codec under study, all over the same
  base; ``active`` picks which one the model's ``all_reduce`` goes through. One loaded
  model thus serves every codec (loading Gemma-3-270M per codec would cost more than
  evaluating it), and switching is a Python attribute, identical on every rank.
* :func:`rank_logits` returns full-vocab logits, optionally at selected positions only
  (a forward pre-hook on the final norm gathers those rows, so the LM head runs on them
  alone; the decoder is unchanged and the row-parallel reduces see the full batch).
"""
from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Sequence

import torch

from megatron_lite.comm.communicator import Communicator, WrappingCommunicator


def torchrun_world_size() -> Optional[int]:
    """WORLD_SIZE when launched by torchrun (RANK and WORLD_SIZE set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


class CodecSwitch(WrappingCommunicator):
    """A communicator that forwards to ``comms[active]``; all of them share one base, which
    serves ``all_gather`` and the primitives. Every rank must set the same ``active``."""

    def __init__(self, base: Communicator, comms: Sequence[Communicator]):
        super().__init__(base)
        self.comms, self.active = list(comms), 0

    def all_reduce(self, x, site=None):
        if self.world_size == 1:
            return x
        return self.comms[self.active].all_reduce(x, site)



def load_rank_engine(ckpt: str, comm: Communicator, dtype=torch.float32):
    """This rank's Engine (no tokenizer: the tools tokenize once, before the ranks start)."""
    from megatron_lite.checkpoint.loader import load_rank_state
    from megatron_lite.inference.engine import Engine
    from megatron_lite.parallel_state import TPGroup
    hf_config, state, _ = load_rank_state(ckpt, comm.rank, comm.world_size, dtype=dtype)
    return Engine.from_rank_state_dict(hf_config, state, None,
                                       group=TPGroup.from_communicator(comm), dtype=dtype)


@torch.inference_mode()
def rank_logits(engine, ids: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 logits ``[B, T, V]``, or ``[B, K, V]`` at positions ``rows`` ([B, K])."""
    if rows is None:
        return engine.logits(ids)
    model = engine.model
    b = torch.arange(ids.shape[0])[:, None]

    def pick(_module, args):
        return (args[0][b, rows.to(args[0].device)],) + tuple(args[1:])
    handle = model.norm.register_forward_pre_hook(pick)
    try:
        return engine.logits(ids)
    finally:
        handle.remove()


def launch(fn: Callable[[Communicator], Any], tp: int, simulated: bool,
           timeout: float = 1800.0) -> List[Any]:
    """Run ``fn(comm)`` on every rank of TP ``tp``.

    Simulated: returns every rank's result; ``timeout`` bounds one rank's wait for its
    peers at a collective, not the run (a 1570-item task run on a shared 2-core CPU took
    over an hour and was killed by the old whole-run limit on 2026-11-30). Real
    (torchrun): joins the process group, runs this rank only and returns ``[result]``;
    the caller checks ``comm.rank``.
    """
    if simulated:
        from megatron_lite.comm.simulate import run_simulated
        return run_simulated(fn, tp, timeout=timeout)
    from megatron_lite.parallel_state import destroy_model_parallel, get_tp_group
    group = get_tp_group()
    if group.world_size != tp:
        destroy_model_parallel()
        raise ValueError(f"--tp {tp} but torchrun started {group.world_size} ranks")
    result = fn(group.communicator)
    # Every rank leaves together and tears the process group down before the interpreter
    # exits: a rank that exits while gloo's threads still run aborts ("terminate called
    # without an active exception", seen in CI on 2026-11-22). Only on success: after an
    # error a peer may still be inside a collective, and tearing down could then block.
    group.barrier()
    destroy_model_parallel()
    return [result]


def row_parallel_sites(num_layers: int) -> List[str]:
    """The sites of the row-parallel reduces (docs/architecture.md), in model order."""
    return [f"layers.{i}.{s}" for i in range(num_layers)
            for s in ("self_attn.o_proj", "mlp.down_proj")]
