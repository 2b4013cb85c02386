"""The bounded per-kind caches of the communication path (megatron_lite/lru.py): the
router's plans and the fused backends' prepared launches forget their least recently used
entries instead of growing with every kind of message a process sees."""
import pytest
import torch

from megatron_lite.lru import LruDict


def test_lru_dict_drops_the_least_recently_used():
    d = LruDict(2)
    d["a"], d["b"] = 1, 2
    assert d.get("a") == 1            # a read makes "a" the most recent
    d["c"] = 3                        # so "b" goes
    assert "b" not in d and d.get("b", "gone") == "gone"
    assert d["a"] == 1 and d["c"] == 3 and len(d) == 2
    d["d"] = None                     # None is a value like any other ("a" goes)
    assert "d" in d and d.get("d", "missing") is None and "a" not in d
    d.clear()
    assert len(d) == 0
    with pytest.raises(KeyError):
        d["c"]
    with pytest.raises(ValueError, match="maxsize"):
        LruDict(0)


def test_launchers_keep_the_recent_kinds(monkeypatch):
    """comm/fused.py's Launchers: a kind forgotten (LAUNCH_CACHE_SIZE exceeded) is prepared
    again on its next call; the kinds still held are not."""
    from megatron_lite.comm import fused
    monkeypatch.setattr(fused, "LAUNCH_CACHE_SIZE", 2)
    launchers, made = fused.Launchers(), []

    def get(n):
        return launchers.get(torch.empty(n), None, lambda: made.append(n) or n)

    assert [get(n) for n in (1, 2, 1, 3, 1, 2)] == [1, 2, 1, 3, 1, 2]
    assert made == [1, 2, 3, 2]       # 2 was forgotten when 3 came (1 had been used since)


def test_router_plans_are_bounded(monkeypatch):
    """The router's plan cache holds at most PLAN_CACHE_SIZE answers; a forgotten plan is
    planned again, alike."""
    from megatron_lite.comm import router
    from megatron_lite.comm.build import build_communicator
    from megatron_lite.comm.simulate import make_thread_communicators
    monkeypatch.setattr(router, "PLAN_CACHE_SIZE", 3)
    qc = build_communicator(make_thread_communicators(1)[0], "int4:128,min_bytes=1KiB")
    site = "layers.0.self_attn.o_proj"
    first = qc.explain(torch.zeros(1000), site)
    for n in range(2000, 2010):       # ten other shapes push the first plan out
        qc.plan(torch.zeros(n), site)
    assert len(qc._plans) == 3
    assert qc.explain(torch.zeros(1000), site) == first


def test_router_keeps_one_runner_per_kind_of_call(monkeypatch):
    """``route`` asks the planned backend for its runner once per (site, shape, dtype,
    device), at most RUN_CACHE_SIZE of them, and again after the chain changes; every call
    runs through the runner and gives the backend's own result."""
    from megatron_lite.comm import router
    from megatron_lite.comm.build import build_communicator
    from megatron_lite.comm.simulate import make_thread_communicators
    monkeypatch.setattr(router, "RUN_CACHE_SIZE", 2)

    class Counting(router.PortableBackend):
        made, ran = [], []

        def runner(self, x, scheme, comm):
            self.made.append(tuple(x.shape))
            inner = super().runner(x, scheme, comm)

            def run(y):
                self.ran.append(tuple(y.shape))
                return inner(y)
            return run

    qc = build_communicator(make_thread_communicators(1)[0], "int4:128,min_bytes=1KiB")
    qc.set_backends([Counting()])
    site = "layers.0.mlp.down_proj"
    x = torch.randn(4, 256)
    want = router.PortableBackend().all_reduce(x, qc.sites.scheme_for(site), qc)
    for _ in range(3):
        assert torch.equal(qc.route(x, site), want)
    assert Counting.made == [(4, 256)] and Counting.ran == [(4, 256)] * 3
    qc.route(x.half(), site)                    # another dtype: another runner
    assert Counting.made == [(4, 256)] * 2
    Counting.made.clear()
    qc.route(torch.randn(8, 256), site)
    qc.route(torch.randn(16, 256), site)        # pushes both (4, 256) runners out
    qc.route(x, site)
    assert Counting.made == [(8, 256), (16, 256), (4, 256)]
    assert len(qc._runs) == 2
    qc.set_backends(qc.backends)                # a new chain: planned again
    qc.route(x, site)
    assert Counting.made[-1] == (4, 256) and len(Counting.made) == 4
    # a native site (the embedding's) runs the base communicator's sum, through a runner too
    assert torch.equal(qc.route(x, "embed_tokens"), x)
