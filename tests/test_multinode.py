"""TP across two "nodes": ``torchrun --nnodes=2 --nproc_per_node=2`` on one host, each
launcher started with its ``--node-rank``, runs TP 4 over gloo and generates the same
tokens as a single-node TP 4 run, with the native and a quantized all-reduce."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_tool

PROMPTS = ["The river rises in the hills", "Once upon a time there was"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate_args(ckpt, comm, out):
    args = ["tools/generate.py", "--ckpt", str(ckpt), "--max-new-tokens", "12",
            "--dtype", "fp32", "--json", str(out)]
    for p in PROMPTS:
        args += ["--prompt", p]
    return args + (["--comm", comm] if comm else [])


def _two_nodes(ckpt, comm, out):
    """Two launchers of two ranks each, rendezvous through a static master address."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               TOKENIZERS_PARALLELISM="false")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
         f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}"]
        + _generate_args(ckpt, comm, out), cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]


@pytest.mark.parametrize("comm", [None, "int4:32", "ef+hadamard-int4:32,algo=one-shot"])
def test_two_nodes_equal_one_node_at_tp4(comm, tiny_hf_dir, tmp_path):
    ckpt = tiny_hf_dir("llama")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    r = run_tool(["torchrun", "--nproc_per_node=4"] + _generate_args(ckpt, comm, one))
    assert r.returncode == 0, r.stderr[-3000:]
    _two_nodes(ckpt, comm, two)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["world_size"] == b["world_size"] == 4
    assert [x["token_ids"] for x in a["results"]] == [x["token_ids"] for x in b["results"]]
    assert all(len(x["token_ids"]) == 12 for x in a["results"])
