"""The Python API: build an Engine in a few lines and generate a batch.

    python examples/python_api.py                                 # world size 1
    torchrun --nproc_per_node=2 examples/python_api.py            # TP 2

Any shard directory (TP == world size) or HF directory works as the checkpoint; here the
bundled default model, converted on first use.
"""

from megatron_lite import Engine
from megatron_lite.checkpoint.gguf import ensure_shards
from megatron_lite.parallel_state import destroy_model_parallel, initialize_model_parallel

group = initialize_model_parallel()                        # from the torchrun environment
ckpt = ensure_shards("gemma-3-270m", tp=group.world_size)  # a shard directory for this TP
engine = Engine.from_pretrained(ckpt, group=group, dtype="fp32")

prompts = ["The capital of Italy is", "Water boils at a temperature of",
           "The first person to walk on the Moon was"]
results = engine.generate(prompts, max_new_tokens=24, temperature=0.0)

if group.rank == 0:   # every rank holds the same results; print once
    for r in results:
        print(f"{r.prompt!r} -> {r.text!r} ({r.finish_reason}, {len(r.token_ids)} tokens)")
    print(f"TTFT {results[0].ttft_s * 1e3:.0f} ms, {results[0].batch_tokens_per_s:.1f} tokens/s")
destroy_model_parallel()
