"""The two worked examples, small: the paged decode step (CUDA graph, torch.compile) and the compiled training
step that teaches the indexer (examples/). CPU tests are the reference; GPU tests skip cleanly without CUDA."""
import dataclasses

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import dsa_ops
from examples import decode_server as ds
from examples import train_step as ts


# Tiny CPU tensors: a second OpenMP thread only adds barrier waits (and on a busy CI machine, long ones).
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------------
# Prompts chosen so that every sequence crosses a page boundary (page = 8) within the decoded tokens, and one
# sequence has fewer keys than topk (its top-k is padded with -1).
PROMPT_LENS = [3, 15, 22]


def new_pages(prompt_lens, steps, page):
    """Pages the host must hand out while decoding: one per page boundary a sequence crosses."""
    return sum(sum(1 for p in range(n, n + steps) if p % page == 0) for n in prompt_lens)


def naive_decode_output(layer, prompt, new_tokens):
    """The layer's output for the last of `new_tokens` of one sequence, recomputed from scratch on contiguous
    keys with the non-paged ops: the oracle for the paged cache bookkeeping (slots, pages, lengths)."""
    c = layer.cfg
    hidden = torch.cat([prompt, new_tokens])                     # every token of the sequence so far
    x = new_tokens[-1:]
    k_idx, kv = layer.project_keys(hidden)
    q_idx = (x @ layer.w_q_idx).view(1, 1, c.idx_heads, c.idx_dim)
    w = ((x @ layer.w_w).float() * c.idx_heads ** -0.5).view(1, 1, c.idx_heads)
    ids, _ = dsa_ops.indexer_topk(q_idx, k_idx.unsqueeze(0), w, c.topk, c.idx_dim ** -0.5)
    q = (x @ layer.w_q).view(1, c.n_heads, c.head_dim)
    out, _ = dsa_ops.sparse_attention(q, kv, ids[0], c.head_dim ** -0.5, c.d_v)
    return out.reshape(1, -1) @ layer.w_o


def test_decode_eager_matches_naive_recompute():
    steps = 7
    layer, cache, tokens, prompts = ds.make_server(ds.TINY, len(PROMPT_LENS), steps, "cpu", torch.float32,
                                                   prompt_lens=PROMPT_LENS)
    with torch.no_grad():
        outputs, _ = ds.run_eager(layer, cache, tokens)
        for t in range(steps):
            for b, prompt in enumerate(prompts):
                want = naive_decode_output(layer, prompt, tokens[: t + 1, b])
                torch.testing.assert_close(outputs[t][b:b + 1], want, rtol=1e-5, atol=1e-5)
    assert cache.seq_lens.tolist() == [n + steps for n in PROMPT_LENS]
    assert cache.pages_assigned == new_pages(PROMPT_LENS, steps, ds.TINY.page_size) == 3


def test_decode_step_has_no_graph_breaks():
    layer, cache, tokens, _ = ds.make_server(ds.TINY, 3, 1, "cpu", torch.float32, prompt_lens=PROMPT_LENS)
    cache.reserve_next_token()
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(layer.decode_step)(tokens[0], *cache.tensors())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_decode_dynamic_no_recompile():
    """One layer serving two batch sizes with two cache sizes (and growing lengths): one compiled frame."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    layer = None
    for batch, prompt_lens in ((3, PROMPT_LENS), (5, [9, 2, 30, 17, 41])):
        layer, start, tokens, _ = ds.make_server(ds.TINY, batch, 4, "cpu", torch.float32,
                                                 prompt_lens=prompt_lens, layer=layer)
        step = torch.compile(layer.decode_step, backend=counter, fullgraph=True, dynamic=True)
        with torch.no_grad():
            want, _ = ds.run_eager(layer, start.clone(), tokens)
            cache, got = start.clone(), []
            for x in tokens:
                cache.reserve_next_token()
                got.append(step(x.clone(), *cache.tensors()))  # a fresh tensor, as a server has
                cache.advance()
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"


def test_decode_compiled_matches_eager():
    torch._dynamo.reset()
    r = ds.run_decode(steps=6, batch=3, device="cpu", compile=True, prompt_lens=PROMPT_LENS)
    assert r["compiled_rel_err"] <= 1e-5, r
    assert r["compiled_cache_err"] <= 1e-6, r
    assert r["pages_assigned"] == new_pages(PROMPT_LENS, 6, ds.TINY.page_size) == 3
    assert r["final_lens"] == [n + 6 for n in PROMPT_LENS]


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
SMALL = dataclasses.replace(ts.CPU, seq=32)


@pytest.mark.parametrize("phase", ["dense", "sparse"])
def test_train_step_has_no_graph_breaks(phase):
    task, model = ts.Task(SMALL), ts.SparseBlock(SMALL)
    x, y, _ = task.batch(torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(getattr(model, f"{phase}_losses"))(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_train_step_dynamic_no_recompile():
    """Both phases at two sequence lengths: forward and backward equal eager, one frame per phase."""
    torch._dynamo.reset()
    task, model = ts.Task(SMALL), ts.SparseBlock(SMALL)
    counters = {phase: torch._dynamo.testing.CompileCounterWithBackend("aot_eager") for phase in ("dense", "sparse")}
    compiled = {phase: torch.compile(getattr(model, f"{phase}_losses"), backend=counters[phase], fullgraph=True,
                                     dynamic=True) for phase in counters}
    g = torch.Generator().manual_seed(1)
    for seq in (37, 45):  # lengths equal to no other dim (duck sizing would tie them to it)
        x, y, _ = task.batch(g, seq=seq)
        for phase, fn in compiled.items():
            want_losses, want_grads = ts.losses_and_grads(getattr(model, f"{phase}_losses"), model, x, y)
            got_losses, got_grads = ts.losses_and_grads(fn, model, x, y)
            for got, want in zip(got_losses + got_grads, want_losses + want_grads):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for phase, counter in counters.items():
        assert counter.frame_count == 1, f"{phase}: recompiled, {counter.frame_count} frames"


def test_training_teaches_the_indexer(tmp_path):
    """150 compiled steps on a fixed seed: the first step equals eager, the losses stay in their lanes, and the
    indexer's top-k goes from a random pick to holding the useful keys and most of the attention mass."""
    torch._dynamo.reset()
    r = ts.train(steps=150, device="cpu", seed=0, backend="aot_eager", log_every=50, out_dir=str(tmp_path))
    check = r["check"]
    for phase in ("dense", "sparse"):
        assert check[f"{phase}_loss_rel_err"] <= 1e-5 and check[f"{phase}_grad_rel_err"] <= 1e-5, check
        assert check[f"{phase}_grads_nonzero"], check
        assert check[f"{phase}_cross_grad"] == 0.0, check  # main loss -/-> indexer, indexer loss -/-> rest
    first, last = r["curve"][0], r["curve"][-1]
    assert abs(first["mass_recall"] - r["random_recall"]) < 0.05  # an untrained model is a random pick
    assert last["mass_recall"] >= first["mass_recall"] + 0.15, r["curve"]
    assert last["mass_recall"] >= 0.9 * last["best_mass"], r["curve"]  # nearly the best k keys of attention
    assert last["key_recall"] >= 0.9 and last["key_recall"] >= first["key_recall"] + 0.4, r["curve"]
    assert last["main_loss"] < 0.5 * first["main_loss"], r["curve"]
    assert (tmp_path / "train_curve.csv").read_text().count("\n") == len(r["curve"]) + 1


# ---------------------------------------------------------------------------------------------------------
# GPU: CUDA graph capture and replay, reduce-overhead, no host sync
# ---------------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
# V3.2 head shapes; prompts that cross page boundaries (page = 64) during the 8 decoded tokens, and one
# sequence shorter than topk.
GPU_PROMPTS = [5, 60, 126, 700]


@gpu
def test_decode_cuda_graph_replay_matches_eager():
    r = ds.run_decode(steps=8, batch=len(GPU_PROMPTS), device="cuda", cfg=ds.GPU, graph=True,
                      prompt_lens=GPU_PROMPTS)
    # pages handed out between replays, written into the static block table
    assert r["pages_assigned"] == new_pages(GPU_PROMPTS, 8, ds.GPU.page_size) == 3, r
    assert r["graph_rel_err"] <= 1e-2, r
    assert r["graph_cache_err"] <= 1e-2, r


@gpu
def test_decode_reduce_overhead_matches_eager():
    torch._dynamo.reset()
    r = ds.run_decode(steps=8, batch=len(GPU_PROMPTS), device="cuda", cfg=ds.GPU, graph=False, compile=True,
                      prompt_lens=GPU_PROMPTS)
    assert r["compiled_rel_err"] <= 1e-2, r
    assert r["compiled_cache_err"] <= 1e-2, r
    assert r["compiled_cudagraph_skips"] == 0, "torch.compile(mode='reduce-overhead') fell back to no CUDA graph"


@gpu
def test_decode_step_does_not_sync():
    out = ds.check_no_host_sync(ds.GPU, batch=4)
    assert torch.isfinite(out.float()).all()
