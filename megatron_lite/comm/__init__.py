"""The comm layer: how the TP sum of every row-parallel layer crosses the wire.

From the model to the wire::

    RowParallelLinear.forward                        tensor_parallel/layers.py
      -> reduce_from_tensor_model_parallel_region    tensor_parallel/mappings.py
        -> TPGroup.all_reduce(x, site)               parallel_state.py
          -> Communicator.all_reduce(x, site)        communicator.py (native)
             QuantizedCommunicator.all_reduce        router.py: cached plan -> backend
               -> kernel backends (NCCL groups)      fused.py -> megatron_lite.kernels
               -> PortableBackend                    algorithms.py: two-step / one-shot
                  over Scheme (codecs/base.py), each codec family a module of codecs/

``RowParallelLinear.forward_add_rmsnorm`` takes the same way to
``Communicator.all_reduce_add_rmsnorm``: the sum followed by the residual add and
RMSNorm of norm.py, one kernel on the one-shot paths of fused.py, all_reduce plus torch
ops elsewhere.

spec.py parses ``--comm`` into a CommSpec; build.py turns it into the chain; transport.py
says how the ranks reach each other (which picks the ``auto`` table); feedback.py adds
error feedback; calibration.py is the calibration file; simulate.py runs N ranks as
N threads of one process, bit-identical to real ranks.
"""
