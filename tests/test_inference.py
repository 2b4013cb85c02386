"""Generation: greedy vs transformers, batching, sampling, rank identity, stopping, streaming."""
from __future__ import annotations

import functools

import pytest
import torch

from megatron_lite.comm.communicator import DistCommunicator
from megatron_lite.inference.sampling import filter_logits, sample, validate_sampling
from megatron_lite.parallel_state import TPGroup
from tests._dist import run_distributed
from tests.tiny_configs import hf_config_dict, make_hf_model


def _single():
    return TPGroup(DistCommunicator(None))


@functools.lru_cache(maxsize=None)
def _hf(name):
    return make_hf_model(name)


def _engine(name, group=None, **kw):
    from megatron_lite.inference.engine import Engine
    return Engine.from_hf_state_dict(hf_config_dict(name), _hf(name).state_dict(),
                                     group=group or _single(), device="cpu", **kw)


def _hf_greedy(name, ids, n):
    out = _hf(name).generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


PROMPTS = [[1, 17, 33, 99, 5, 61, 7, 8, 120, 4, 4, 9], [1, 200, 3], [1, 50, 51, 52, 53, 54, 55]]


# --------------------------------------------------------------------- greedy vs HF
@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3_text"])
def test_greedy_batch_matches_transformers_generate(name):
    eng = _engine(name, max_batch_size=2)            # 3 prompts -> batches of 2 and 1
    results = eng.generate(PROMPTS, max_new_tokens=12)
    for ids, r in zip(PROMPTS, results):
        ref = _hf_greedy(name, ids, 12)
        assert r.token_ids == ref
        assert r.prompt_token_ids == ids
        assert r.finish_reason == ("eos" if ref[-1] in eng.eos_token_ids else "length")
        assert r.ttft_s > 0 and r.tokens_per_s > 0


def test_eos_stops_the_sequence_and_is_kept():
    eng = _engine("llama")
    free = eng.generate([PROMPTS[0]], max_new_tokens=12)[0].token_ids
    k = 5
    first = free.index(free[k])                      # the first occurrence is where it stops
    eng.eos_token_ids = (free[k],)
    r = eng.generate([PROMPTS[0]], max_new_tokens=12)[0]
    assert r.finish_reason == "eos" and r.token_ids == free[:first + 1]


def test_compile_by_default_only_where_measured_faster():
    """compile=None compiles the decode step on a CUDA device at TP 1 with graph decode
    (measured faster there), never on CPU or at TP > 1 (unmeasured); explicit wins."""
    from megatron_lite.inference.engine import default_compile
    cuda = torch.device("cuda", 0)
    assert default_compile(cuda, 1, True)
    assert not default_compile(cuda, 2, True) and not default_compile(cuda, 1, False)
    assert not default_compile(torch.device("cpu"), 1, False)
    assert _engine("llama").compiled is False                # CPU: eager
    assert _engine("llama", compile=True).compiled is True


def test_compile_prefill_by_default_only_with_a_default_compiled_decode():
    """compile_prefill=None compiles the prefill where the decode compiles and that is
    the default (CUDA, TP 1, graph decode: measured faster there), not on CPU even with
    compile=True; explicit wins."""
    from megatron_lite.inference.engine import default_compile_prefill
    cuda = torch.device("cuda", 0)
    assert default_compile_prefill(True, cuda, 1, True)
    assert not default_compile_prefill(False, cuda, 1, True)       # eager decode asked for
    assert not default_compile_prefill(True, cuda, 2, True)        # TP > 1: unmeasured
    assert not default_compile_prefill(True, cuda, 1, False)
    assert not default_compile_prefill(True, torch.device("cpu"), 1, False)
    eng = _engine("llama", compile=True)
    assert eng.compiled is True and eng.compiled_prefill is False
    assert _engine("llama", compile_prefill=True).compiled_prefill is True


def test_max_new_tokens_and_bad_arguments():
    eng = _engine("llama", max_seq_len=40)
    eng.eos_token_ids = ()
    r = eng.generate(PROMPTS[1], max_new_tokens=7)[0]          # a single prompt is accepted
    assert r.finish_reason == "length" and len(r.token_ids) == 7
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        eng.generate([PROMPTS[0]], max_new_tokens=30)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.generate([[]])
    with pytest.raises(ValueError, match="out of range"):
        eng.generate([[1, 250]])
    with pytest.raises(ValueError, match="no tokenizer"):
        eng.generate(["text"])
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            eng.generate([PROMPTS[1]], **{**dict(temperature=1.0), **bad})


# --------------------------------------------------------------------- sampling
def test_greedy_is_argmax_and_ignores_generator():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))


def test_top_k_and_top_p_sets():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    keep = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.7) == [True, True, False, False]     # mass before token 2 is 0.8
    assert keep(top_p=0.85) == [True, True, True, False]
    assert keep(top_p=0.3) == [True, False, False, False]    # the top token always stays
    assert keep(top_k=3, top_p=0.85) == [True, True, True, False]
    assert keep(top_k=1, top_p=1.0) == [True, False, False, False]


def _freq(tokens, n):
    return torch.bincount(tokens, minlength=n).float() / tokens.numel()


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    rows = logits.expand(40000, 6)
    gen = torch.Generator().manual_seed(0)
    # temperature only: softmax(logits / T)
    f = _freq(sample(rows, 0.7, generator=gen), 6)
    torch.testing.assert_close(f, torch.softmax(logits / 0.7, -1), atol=0.01, rtol=0)
    # top-k 3: renormalised over the 3 largest, nothing else ever drawn
    f = _freq(sample(rows, 1.0, top_k=3, generator=gen), 6)
    expect = torch.zeros(6)
    expect[:3] = torch.softmax(logits[:3], -1)
    torch.testing.assert_close(f, expect, atol=0.01, rtol=0)
    # top-p 0.8: p = [.44, .27, .16, .06, ...] -> keep tokens 0..2
    f = _freq(sample(rows, 1.0, top_p=0.8, generator=gen), 6)
    expect = torch.zeros(6)
    expect[:3] = torch.softmax(logits[:3], -1)
    torch.testing.assert_close(f, expect, atol=0.01, rtol=0)


def test_seed_determinism():
    eng = _engine("gemma")
    eng.eos_token_ids = ()
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=100, top_p=0.95)
    a = [r.token_ids for r in eng.generate(PROMPTS, seed=7, **kw)]
    b = [r.token_ids for r in eng.generate(PROMPTS, seed=7, **kw)]
    c = [r.token_ids for r in eng.generate(PROMPTS, seed=8, **kw)]
    assert a == b and a != c


def test_validate_sampling_messages():
    validate_sampling(0.0, None, None)
    with pytest.raises(ValueError, match="top_p"):
        validate_sampling(1.0, None, 0.0)


# --------------------------------------------------------------------- multi-rank
def _tp_generate_worker(rank, ws, sd, nan_token):
    from megatron_lite.inference.engine import Engine
    from megatron_lite.parallel_state import destroy_model_parallel, initialize_model_parallel
    try:
        eng = Engine.from_hf_state_dict(hf_config_dict("llama"), sd, device="cpu",
                                        group=initialize_model_parallel())
        eng.eos_token_ids = ()
        sampled = eng.generate(PROMPTS, max_new_tokens=16, temperature=1.0, top_k=50,
                               top_p=0.9, seed=123)
        # Poison one embedding row on the rank that owns it: the NaN reaches the other
        # rank through the embedding all-reduce, in that sequence's row only.
        emb = eng.model.embed_tokens
        if emb.vocab_start <= nan_token < emb.vocab_end:
            emb.weight.data[nan_token - emb.vocab_start] = float("nan")
        poisoned = eng.generate([[1, 5, nan_token], [1, 5, 8]], max_new_tokens=6)
        alone = eng.generate([[1, 5, 8]], max_new_tokens=6)
        return ([r.token_ids for r in sampled],
                [(r.finish_reason, r.token_ids) for r in poisoned + alone])
    finally:
        destroy_model_parallel()


def test_tp2_ranks_sample_identically_and_survive_nan():
    per_rank = run_distributed(_tp_generate_worker, 2, _hf("llama").state_dict(), 7)
    assert per_rank[0] == per_rank[1]
    sampled, (poisoned, clean, alone) = per_rank[0]
    assert all(len(t) == 16 for t in sampled) and len({tuple(t) for t in sampled}) == 3
    assert poisoned == ("nonfinite", [])                 # stopped, no garbage token
    assert clean == alone and len(clean[1]) > 0         # the other row is unaffected


def _tp_stream_rank0_worker(rank, ws, sd):
    from megatron_lite.inference.engine import Engine
    from megatron_lite.parallel_state import destroy_model_parallel, initialize_model_parallel
    try:
        eng = Engine.from_hf_state_dict(hf_config_dict("llama"), sd, device="cpu",
                                        group=initialize_model_parallel())
        eng.eos_token_ids = ()
        free = eng.generate([PROMPTS[0]], max_new_tokens=12)[0].token_ids
        eng.eos_token_ids = (free[1],)               # EOS at step 2, well before sync_every
        pieces = []
        stream = (lambda i, piece: pieces.append(piece)) if rank == 0 else None
        early = eng.generate([PROMPTS[0]], max_new_tokens=12, stream=stream)[0]
        after = eng.generate([PROMPTS[1]], max_new_tokens=4)[0]   # collectives still aligned
        return free, early.finish_reason, early.token_ids, after.token_ids
    finally:
        destroy_model_parallel()


def test_tp2_streaming_on_rank0_only_stops_all_ranks_together():
    """Regression: a rank with a stream callback used to consume tokens every step and
    leave the decode loop at EOS while its peers, checking every ``sync_every`` steps, ran
    another collective and died (found with SmolLM2 TP3 --chat)."""
    per_rank = run_distributed(_tp_stream_rank0_worker, 2, _hf("llama").state_dict())
    assert per_rank[0] == per_rank[1]
    free, reason, tokens, after = per_rank[0]
    first = free.index(free[1])
    assert reason == "eos" and tokens == free[:first + 1]
    assert len(after) == 4


# --------------------------------------------------------------------- text: stop, stream, chat
@pytest.fixture(scope="module")
def text_engine(tiny_hf_dir):
    from megatron_lite.inference.engine import Engine
    eng = Engine.from_pretrained(tiny_hf_dir("llama"), group=_single(), device="cpu")
    eng.eos_token_ids = ()
    return eng


def test_stop_strings_cut_text_and_streaming_reassembles_it(text_engine):
    eng = text_engine
    pieces = {0: [], 1: []}
    stream = lambda i, piece: pieces[i].append(piece)  # noqa: E731
    free = eng.generate(["hello", "abc"], max_new_tokens=40, stream=stream)
    for i, r in enumerate(free):
        assert "".join(pieces[i]) == r.text
        assert r.text == eng.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    text = free[0].text
    assert len(text) >= 6, "fixture model should produce some printable text"
    stop = text[3:5]
    cut = text.index(stop)
    pieces = {0: [], 1: []}
    r = eng.generate(["hello", "abc"], max_new_tokens=40, stop=[stop, "\x00never"],
                     stream=stream)
    assert r[0].finish_reason == "stop" and r[0].text == text[:cut]
    assert "".join(pieces[0]) == r[0].text
    # the token that completed the stop string is the last one kept
    decode = lambda ids: eng.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert stop in decode(r[0].token_ids) and stop not in decode(r[0].token_ids[:-1])
    assert r[1].text == free[1].text[:free[1].text.find(stop)] if stop in free[1].text \
        else r[1].text == free[1].text


def test_chat_template_is_applied(text_engine):
    tok = text_engine.tokenizer
    with pytest.raises(ValueError, match="no chat template"):
        text_engine.encode("hi", chat=True)
    tok.chat_template = ("<s>{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                         "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    try:
        ids = text_engine.encode("hi", chat=True)
        assert tok.decode(ids) == "<s>[user]hi[assistant]"
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        r = text_engine.generate("hi", chat=True, max_new_tokens=3)[0]
        assert r.prompt_token_ids == ids
    finally:
        tok.chat_template = None


# --------------------------------------------------------------------- torch.compile decode
def _tp_compile_worker(rank, ws, name, sd, comm):
    from megatron_lite.inference.engine import Engine
    from megatron_lite.parallel_state import destroy_model_parallel, initialize_model_parallel
    try:
        group = initialize_model_parallel()
        out = {}
        for compiled in (False, True):
            eng = Engine.from_hf_state_dict(hf_config_dict(name), sd, device="cpu",
                                            group=group if comm is None else None, comm=comm,
                                            compile=compiled)
            eng.eos_token_ids = ()
            tokens = [r.token_ids for r in eng.generate(PROMPTS[:2], max_new_tokens=10)]
            # one decode step's logits at the cache state the generation left behind
            tok = torch.tensor([3, 5])
            pos = torch.tensor([len(PROMPTS[0]) + 10, len(PROMPTS[1]) + 10])
            logits = eng.decode_step(tok, pos).clone()
            out[compiled] = (tokens, logits)
        from torch._dynamo.utils import counters
        out["graphs"] = counters["stats"]["unique_graphs"]   # compiled, not silently eager
        out["breaks"] = dict(counters["graph_break"])
        return out
    finally:
        destroy_model_parallel()


@pytest.mark.parametrize("name,comm", [("gemma3_text", None), ("llama", "int4:32")])
def test_tp2_compiled_decode_matches_eager(name, comm):
    """Engine(compile=True): the decode step under torch.compile (inductor on the CPU) gives
    the eager step's greedy tokens and logits to fp32 rounding, through a plain and a
    quantized all-reduce, with ranks bitwise identical. The collectives are custom ops, so
    the whole step is one graph with no break."""
    per_rank = run_distributed(_tp_compile_worker, 2, name, _hf(name).state_dict(), comm)
    for compiled in (False, True):
        t0, l0 = per_rank[0][compiled]
        t1, l1 = per_rank[1][compiled]
        assert t0 == t1 and torch.equal(l0, l1)
    # compiled, as one graph per shape: no graph break at the collectives
    assert per_rank[0]["graphs"] >= 1 and not per_rank[0]["breaks"], per_rank[0]["breaks"]
    (te, le), (tc, lc) = per_rank[0][False], per_rank[0][True]
    assert tc == te
    assert (lc - le).abs().max() <= 1e-4 * le.abs().max()


def _tp_compile_prefill_worker(rank, ws, name, sd):
    from torch._dynamo.utils import counters
    from megatron_lite.inference.engine import Engine
    from megatron_lite.parallel_state import destroy_model_parallel, initialize_model_parallel
    try:
        group = initialize_model_parallel()
        out, longer = {}, [p + [7, 11, 13, 17, 19] for p in PROMPTS]
        for compiled in (False, True):
            eng = Engine.from_hf_state_dict(hf_config_dict(name), sd, device="cpu",
                                            group=group, compile_prefill=compiled)
            runs = []
            for i, prompts in enumerate((PROMPTS[:2], PROMPTS[:1], longer[1:], longer[:1])):
                if i == 2:   # the same batch sizes at new lengths: no new compile
                    out[f"graphs{compiled}"] = counters["stats"]["unique_graphs"]
                T = max(map(len, prompts))
                tokens = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
                lengths = torch.tensor([len(p) for p in prompts])
                runs.append(eng.prefill(tokens, lengths, T + 8).clone())
            out[compiled] = runs
        out["graphs"] = counters["stats"]["unique_graphs"]
        out["breaks"] = dict(counters["graph_break"])
        return out
    finally:
        destroy_model_parallel()


def test_tp2_compiled_prefill_matches_eager():
    """Engine(compile_prefill=True): prefill under torch.compile with dynamic prompt
    lengths gives the eager prefill's logits to fp32 rounding (so the same first tokens),
    ranks bitwise identical, no graph break; prompts of new lengths reuse the graphs
    compiled for the first ones (batch size 1 gets its own)."""
    per_rank = run_distributed(_tp_compile_prefill_worker, 2, "llama",
                               _hf("llama").state_dict())
    for compiled in (False, True):
        assert all(torch.equal(a, b) for a, b in zip(per_rank[0][compiled],
                                                     per_rank[1][compiled]))
    for le, lc in zip(per_rank[0][False], per_rank[0][True]):
        assert torch.equal(lc.argmax(-1), le.argmax(-1))
        assert (lc - le).abs().max() <= 1e-4 * le.abs().max()
    assert not per_rank[0]["breaks"], per_rank[0]["breaks"]
    assert per_rank[0]["graphs"] == per_rank[0]["graphsTrue"] >= 1


# --------------------------------------------------------------------- incremental text
DETOK_TEXT = ("Tensor parallelism splits  weights.\nNaïve café — 東京 and emoji 🚀🧪 end.\t"
              "Zürich, São Paulo; ½ ≠ ⅓ ... \"quotes\" 'x'  \n\n  indented")


def _check_incremental(tok, ids):
    from megatron_lite.inference.text import IncrementalDetokenizer
    d = IncrementalDetokenizer(tok)
    pieces = []
    for i, t in enumerate(ids):
        pieces.append(d.push(t))
        full = tok.decode(ids[:i + 1], skip_special_tokens=True,
                          clean_up_tokenization_spaces=False)
        assert full.startswith(d.text), (i, d.text[-20:], full[-20:])
        assert "".join(pieces) == d.text
        assert d.read - d.prefix <= 8 or full.endswith("\ufffd")   # the window stays short
    assert d.full() == full
    return d.text, full


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_incremental_detokenizer_matches_full_decode(which, request):
    """Real tokenizers (byte-level BPE; SentencePiece with byte fallback): the streamed text
    is always a prefix of the full decode, ends equal to it, and decodes a short window."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(f"{which}_hf_dir"))
    ids = tok(DETOK_TEXT, add_special_tokens=False)["input_ids"]
    text, full = _check_incremental(tok, ids)
    assert text == full == DETOK_TEXT
    rng = torch.Generator().manual_seed(0)             # arbitrary ids, e.g. lone byte pieces
    rand = torch.randint(0, len(tok), (300,), generator=rng).tolist()
    _check_incremental(tok, rand)


def test_incremental_detokenizer_char_tokenizer(text_engine):
    tok = text_engine.tokenizer
    ids = tok("hello world, again", add_special_tokens=False)["input_ids"]
    text, full = _check_incremental(tok, ids)
    assert text == full
