"""Paged sparse-attention decode as an inference server runs it: one step captured in a CUDA graph, replayed.

A DeepSeek-V3.2-style attention layer decodes a batch of sequences over a paged KV cache; its decode step is
captured once in a CUDA graph and replayed for every new token.

Per step (all on the device, no host sync, so the step can be captured):
  1. project the new token's hidden state `x [B, d_model]`: attention queries `q [B,1,H,D]`, the MLA latent
     `kv = x W_kv [B, D]`, the indexer query `q_idx [B,1,H_I,D_I]`, key `k_idx [B, D_I]` and weights `w`;
  2. write `k_idx` and `kv` into the token's page slot (slot from `seq_lens` and `block_table`, index_copy_);
  3. `seq_lens += 1`;
  4. `dsa_ops.indexer_topk_paged` picks `topk` token positions; `dsa_ops.sparse_attention_decode` attends to them;
  5. output projection.
Pages are assigned by the host *between* steps: when a sequence is about to write the first token of a new page,
the host pops a free page and writes it into the (static) `block_table` tensor, as a server's block manager
would. The host knows every length without asking the device: it counts the steps it launched.

`python -m examples.decode_server [--steps N] [--batch B] [--compile]` prints the eager step time, the graph
replay time (CUDA) and the replay-vs-eager error at every token (max over tokens); `--compile` adds
torch.compile(mode="reduce-overhead") of the same step. On a CPU-only machine it runs eager and compiled (no
graph) at a tiny size. The function `run_decode(...)` returns the same numbers as a dict (the tests use it).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import time
from typing import Optional

import torch
from torch import Tensor, nn

import dsa_ops


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    d_model: int = 64      # hidden size of the token entering the layer
    n_heads: int = 4       # H, attention query heads (MQA: all share one latent kv)
    head_dim: int = 48     # D, latent width (V3.2: 576 = 512 NoPE + 64 RoPE)
    d_v: int = 32          # value width: V = kv[:, :d_v] (V3.2: 512)
    idx_heads: int = 4     # H_I, indexer heads (V3.2: 64)
    idx_dim: int = 16      # D_I, indexer key width (V3.2: 128)
    topk: int = 12         # keys each query attends to (V3.2: 2048)
    page_size: int = 8     # tokens per cache page (V3.2 serving: 64)


TINY = DecodeConfig()
# The V3.2 head shapes (the ones the GPU kernels are built for), with a small model width and top-k so the
# example fits any GPU and starts fast.
GPU = DecodeConfig(d_model=1024, n_heads=16, head_dim=576, d_v=512, idx_heads=64, idx_dim=128, topk=256,
                   page_size=64)


class SparseDecodeLayer(nn.Module):
    """The weights of one DSA attention layer; `decode_step` is the per-token work of a server."""

    def __init__(self, cfg: DecodeConfig, dtype=torch.float32, device="cpu", seed: int = 0):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)

        def weight(fan_in, fan_out):  # 1/sqrt(fan_in) init keeps activations O(1)
            w = torch.randn(fan_in, fan_out, generator=g) * fan_in ** -0.5
            return nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)

        c = cfg
        self.w_q = weight(c.d_model, c.n_heads * c.head_dim)
        self.w_kv = weight(c.d_model, c.head_dim)
        self.w_q_idx = weight(c.d_model, c.idx_heads * c.idx_dim)
        self.w_k_idx = weight(c.d_model, c.idx_dim)
        self.w_w = weight(c.d_model, c.idx_heads)
        self.w_o = weight(c.n_heads * c.d_v, c.d_model)

    def project_keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """What a token leaves in the caches: (indexer key [N, D_I], attention latent [N, D])."""
        return x @ self.w_k_idx, x @ self.w_kv

    def decode_step(self, x: Tensor, k_cache: Tensor, kv_cache: Tensor, block_table: Tensor,
                    seq_lens: Tensor) -> Tensor:
        """One decode step for the batch: x [B, d_model] (the newest token of each sequence) -> [B, d_model].

        Mutates the cache state in place: writes the new token's keys at position seq_lens[b], then
        seq_lens += 1. Pure device work with static shapes: safe to capture in a CUDA graph.
        """
        c = self.cfg
        batch = x.shape[0]
        k_new, kv_new = self.project_keys(x)
        q = (x @ self.w_q).view(batch, 1, c.n_heads, c.head_dim)
        q_idx = (x @ self.w_q_idx).view(batch, 1, c.idx_heads, c.idx_dim)
        # V3.2 scales the indexer weights by H_I^-1/2 and keeps them fp32 (scores are fp32).
        w = ((x @ self.w_w).float() * c.idx_heads ** -0.5).view(batch, 1, c.idx_heads)

        # Cache write: token position p = seq_lens[b] lives in page block_table[b, p // page] at p % page.
        # All tensor ops: no .item(), so nothing waits for the device.
        position = seq_lens.long()
        page = block_table.gather(1, (position // c.page_size).unsqueeze(1)).squeeze(1).long()
        slot = page * c.page_size + position % c.page_size
        k_cache.view(-1, c.idx_dim).index_copy_(0, slot, k_new)
        kv_cache.view(-1, c.head_dim).index_copy_(0, slot, kv_new)
        seq_lens.add_(1)

        ids, _ = dsa_ops.indexer_topk_paged(q_idx, k_cache, block_table, seq_lens, w, c.topk,
                                            c.idx_dim ** -0.5)
        out, _ = dsa_ops.sparse_attention_decode(q, kv_cache, block_table, seq_lens, ids,
                                                 c.head_dim ** -0.5, c.d_v)
        return out.reshape(batch, c.n_heads * c.d_v) @ self.w_o


@dataclasses.dataclass
class PagedCache:
    """The device tensors of a paged KV cache plus the host-side block manager that fills `block_table`.

    Device: k_cache [P, page, D_I], kv_cache [P, page, D], block_table [B, max_pages] int32 (-1 = no page
    yet), seq_lens [B] int32. Host: the free page list and each sequence's length, counted, never read back.
    """
    k_cache: Tensor
    kv_cache: Tensor
    block_table: Tensor
    seq_lens: Tensor
    free_pages: list
    host_lens: list
    host_table: list
    page_size: int
    pages_assigned: int = 0

    @classmethod
    def empty(cls, cfg: DecodeConfig, batch: int, max_len: int, dtype, device, seed: int = 0) -> "PagedCache":
        max_pages = math.ceil(max_len / cfg.page_size)
        n_pages = batch * max_pages + 1
        free = list(range(n_pages))
        random.Random(seed).shuffle(free)  # physical pages in no particular order, as after some uptime
        return cls(
            k_cache=torch.zeros(n_pages, cfg.page_size, cfg.idx_dim, dtype=dtype, device=device),
            kv_cache=torch.zeros(n_pages, cfg.page_size, cfg.head_dim, dtype=dtype, device=device),
            block_table=torch.full((batch, max_pages), -1, dtype=torch.int32, device=device),
            seq_lens=torch.zeros(batch, dtype=torch.int32, device=device),
            free_pages=free, host_lens=[0] * batch, host_table=[[-1] * max_pages for _ in range(batch)],
            page_size=cfg.page_size)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.k_cache, self.kv_cache, self.block_table, self.seq_lens

    def clone(self) -> "PagedCache":
        return dataclasses.replace(
            self, k_cache=self.k_cache.clone(), kv_cache=self.kv_cache.clone(),
            block_table=self.block_table.clone(), seq_lens=self.seq_lens.clone(), free_pages=list(self.free_pages),
            host_lens=list(self.host_lens), host_table=[list(r) for r in self.host_table])

    def reserve_next_token(self) -> None:
        """Before a step: give every sequence whose next token opens a new page a free page.

        A scalar write into the static block_table per new page (a tiny kernel, no sync); a captured graph
        reads the table at replay time, so it sees the new page.
        """
        for b in range(len(self.host_lens)):
            self.reserve_next_token_for(b)

    def reserve_next_token_for(self, b: int) -> None:
        """Sequence b's next token is at position host_lens[b]: make sure its page exists."""
        column = self.host_lens[b] // self.page_size
        if self.host_table[b][column] < 0:
            page = self.free_pages.pop()
            self.host_table[b][column] = page
            self.block_table[b, column] = page
            self.pages_assigned += 1

    def advance(self) -> None:
        """After a step was launched: the device did seq_lens += 1; the host counts along."""
        self.host_lens = [n + 1 for n in self.host_lens]

    def prefill(self, layer: SparseDecodeLayer, prompts: list) -> None:
        """Writes each prompt's keys (prompts[b]: hidden states [L_b, d_model]) and sets the lengths."""
        for b, hidden in enumerate(prompts):
            for _ in range(hidden.shape[0]):  # assign pages token by token, as decoding would
                self.reserve_next_token_for(b)
                self.host_lens[b] += 1
            positions = torch.arange(hidden.shape[0], device=hidden.device)
            pages = self.block_table[b].long()[positions // self.page_size]
            slots = pages * self.page_size + positions % self.page_size
            k_new, kv_new = layer.project_keys(hidden)
            self.k_cache.view(-1, k_new.shape[-1]).index_copy_(0, slots, k_new)
            self.kv_cache.view(-1, kv_new.shape[-1]).index_copy_(0, slots, kv_new)
        self.seq_lens.copy_(torch.tensor(self.host_lens, dtype=torch.int32))
        self.pages_assigned = 0  # count only the pages handed out while decoding


def make_server(cfg: DecodeConfig, batch: int, steps: int, device, dtype, seed: int = 0,
                prompt_lens: Optional[list] = None, layer: Optional[SparseDecodeLayer] = None):
    """(layer (new unless given), a cache prefilled with `batch` prompts of different lengths, the hidden states
    of the next `steps` tokens of every sequence [steps, B, d_model], the prompts' hidden states [L_b, d_model])."""
    g = torch.Generator().manual_seed(seed + 1)
    if prompt_lens is None:  # random lengths over several pages
        longest = 4 * cfg.topk
        prompt_lens = [int(x) for x in torch.randint(cfg.topk // 2, longest, (batch,), generator=g)]
        prompt_lens[0] = 3  # one young sequence: fewer keys than topk, so its top-k is padded with -1
    layer = layer or SparseDecodeLayer(cfg, dtype=dtype, device=device, seed=seed)
    cache = PagedCache.empty(cfg, batch, max(prompt_lens) + steps, dtype, device, seed=seed)
    prompts = [torch.randn(n, cfg.d_model, generator=g).to(device=device, dtype=dtype) for n in prompt_lens]
    cache.prefill(layer, prompts)
    tokens = torch.randn(steps, batch, cfg.d_model, generator=g).to(device=device, dtype=dtype)
    return layer, cache, tokens, prompts


def rel_err(got: Tensor, want: Tensor) -> float:
    """||got - want|| / ||want|| (SPEC section 9's measure), in fp64."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_eager(layer, cache: PagedCache, tokens: Tensor) -> tuple[list, float]:
    """Decodes every token eagerly; returns (outputs per token, ms per step)."""
    outputs = []
    _sync(tokens.device)
    t0 = time.perf_counter()
    for x in tokens:
        cache.reserve_next_token()
        outputs.append(layer.decode_step(x, *cache.tensors()))
        cache.advance()
    _sync(tokens.device)
    return outputs, (time.perf_counter() - t0) * 1e3 / len(tokens)


def capture_decode_graph(layer, cache: PagedCache, static_x: Tensor):
    """Captures one decode step on `cache`'s tensors; returns (graph, static output).

    Warm-up runs first (cuBLAS handles, Triton/CuTe JIT compiles and autotuning happen there, not during the
    capture) on a *copy* of the cache, because a step mutates the cache and the real one must stay untouched.
    Capturing records kernels without running them, so the cache is unchanged after this function.
    """
    scratch = cache.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            scratch.reserve_next_token()
            layer.decode_step(static_x, *scratch.tensors())
            scratch.advance()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer.decode_step(static_x, *cache.tensors())
    return graph, static_out


def run_graph(layer, cache: PagedCache, tokens: Tensor) -> tuple[list, float, float]:
    """Captures once, then per token: host page assignment, copy x into the static input, replay.
    Returns (outputs per token, ms per replayed step, capture ms)."""
    static_x = tokens[0].clone()  # the static input buffer; replays read whatever is copied into it
    t0 = time.perf_counter()
    graph, static_out = capture_decode_graph(layer, cache, static_x)
    _sync(tokens.device)
    capture_ms = (time.perf_counter() - t0) * 1e3
    outputs = []
    t0 = time.perf_counter()
    for x in tokens:
        cache.reserve_next_token()
        static_x.copy_(x)
        graph.replay()
        outputs.append(static_out.clone())  # the next replay overwrites static_out
        cache.advance()
    _sync(tokens.device)
    return outputs, (time.perf_counter() - t0) * 1e3 / len(tokens), capture_ms


def compile_step(layer, cache: PagedCache, backend: str = "inductor", dynamic: Optional[bool] = None):
    """torch.compile of the decode step. On CUDA with inductor: mode="reduce-overhead" (CUDA graphs through
    cudagraph trees); the cache tensors are marked static addresses so the in-graph cache writes are allowed
    and no input is copied per call."""
    on_cuda = cache.k_cache.is_cuda
    if on_cuda:
        for t in cache.tensors():
            torch._dynamo.mark_static_address(t)
    mode = "reduce-overhead" if on_cuda and backend == "inductor" else None
    return torch.compile(layer.decode_step, backend=backend, mode=mode, fullgraph=True, dynamic=dynamic)


def run_compiled(layer, cache: PagedCache, tokens: Tensor, backend: str = "inductor") -> tuple[list, float]:
    """Decodes every token through the compiled step; returns (outputs, ms per step after the first 3 calls,
    which compile, warm up and record)."""
    step = compile_step(layer, cache, backend)
    outputs, t0, warm = [], 0.0, min(3, len(tokens) - 1)
    for i, x in enumerate(tokens):
        if i == warm:
            _sync(tokens.device)
            t0 = time.perf_counter()
        if x.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        cache.reserve_next_token()
        outputs.append(step(x, *cache.tensors()).clone())  # cudagraph outputs are reused by the next call
        cache.advance()
    _sync(tokens.device)
    return outputs, (time.perf_counter() - t0) * 1e3 / max(1, len(tokens) - warm)


def compare(outputs: list, reference: list) -> tuple[float, float]:
    """(max over tokens of ||out - ref|| / ||ref||, max abs error over all tokens)."""
    rel = max(rel_err(o, r) for o, r in zip(outputs, reference))
    abs_ = max((o.double() - r.double()).abs().max().item() for o, r in zip(outputs, reference))
    return rel, abs_


def cache_error(a: PagedCache, b: PagedCache) -> float:
    """How far two caches drifted apart (relative error of the kv cache; lengths and tables must agree)."""
    if not (torch.equal(a.seq_lens, b.seq_lens) and torch.equal(a.block_table, b.block_table)):
        return float("inf")
    return max(rel_err(a.kv_cache, b.kv_cache), rel_err(a.k_cache, b.k_cache))


def run_decode(steps: int = 16, batch: int = 3, device: Optional[str] = None, cfg: Optional[DecodeConfig] = None,
               dtype: Optional[torch.dtype] = None, graph: Optional[bool] = None, compile: bool = False,
               compile_backend: str = "inductor", seed: int = 0, prompt_lens: Optional[list] = None,
               verbose: bool = False) -> dict:
    """Decodes `steps` tokens for `batch` sequences eagerly, then (CUDA) replaying a captured graph and
    (`compile`) through torch.compile, every path from the same prefilled cache on the same tokens.

    Returns a dict: eager_ms; graph_ms, graph_capture_ms, graph_rel_err, graph_max_abs_err, graph_bitwise_equal,
    graph_cache_err (when the graph ran); compiled_ms, compiled_rel_err, compiled_max_abs_err, compiled_cache_err,
    compiled_cudagraph_skips (when compiled); pages_assigned (pages the host handed out while decoding);
    final_lens; and the sizes used.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    cfg = cfg or (GPU if on_cuda else TINY)
    dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
    graph = on_cuda if graph is None else graph
    layer, start, tokens, _ = make_server(cfg, batch, steps, device, dtype, seed, prompt_lens)
    result = dict(device=str(device), dtype=str(dtype).replace("torch.", ""), batch=batch, steps=steps,
                  config=dataclasses.asdict(cfg), prompt_lens=list(start.host_lens))

    with torch.no_grad():
        warm = start.clone()  # one untimed step first: lazy imports, cuBLAS handles, kernel JIT
        warm.reserve_next_token()
        layer.decode_step(tokens[0], *warm.tensors())
        eager_cache = start.clone()
        reference, result["eager_ms"] = run_eager(layer, eager_cache, tokens)
        result["pages_assigned"] = eager_cache.pages_assigned
        result["final_lens"] = eager_cache.seq_lens.tolist()
        if graph:
            graph_cache = start.clone()
            outs, result["graph_ms"], result["graph_capture_ms"] = run_graph(layer, graph_cache, tokens)
            result["graph_rel_err"], result["graph_max_abs_err"] = compare(outs, reference)
            result["graph_bitwise_equal"] = all(torch.equal(o, r) for o, r in zip(outs, reference))
            result["graph_cache_err"] = cache_error(graph_cache, eager_cache)
        if compile:
            compiled_cache = start.clone()
            skips_before = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
            outs, result["compiled_ms"] = run_compiled(layer, compiled_cache, tokens, compile_backend)
            # reduce-overhead falls back to no graph (silently, but counted) if anything in the step forbids one
            result["compiled_cudagraph_skips"] = (torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
                                                  - skips_before)
            result["compiled_rel_err"], result["compiled_max_abs_err"] = compare(outs, reference)
            result["compiled_cache_err"] = cache_error(compiled_cache, eager_cache)
    if verbose:
        report(result)
    return result


def check_no_host_sync(cfg: DecodeConfig = TINY, batch: int = 3, seed: int = 0) -> Tensor:
    """Runs one eager decode step under torch.cuda.set_sync_debug_mode("error"): any host sync inside the
    step (an .item(), a value-dependent shape, a blocking copy) raises. CUDA only. Returns the step output."""
    layer, cache, tokens, _ = make_server(cfg, batch, 1, "cuda", torch.bfloat16, seed)
    with torch.no_grad():
        # Warm-up on a copy first: a JIT compile or an autotuning benchmark on the first call may sync, and
        # a server does that once at start-up, not per token.
        scratch = cache.clone()
        scratch.reserve_next_token()
        layer.decode_step(tokens[0], *scratch.tensors())
        cache.reserve_next_token()  # the host's page bookkeeping is outside the step, as in a server
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = layer.decode_step(tokens[0], *cache.tensors())
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return out


def report(r: dict) -> None:
    c = r["config"]
    print(f"decode on {r['device']} ({r['dtype']}): B={r['batch']} sequences, prompt lengths {r['prompt_lens']}, "
          f"{r['steps']} steps")
    print(f"  layer: d_model={c['d_model']} H={c['n_heads']} D={c['head_dim']} d_v={c['d_v']} "
          f"H_I={c['idx_heads']} D_I={c['idx_dim']} topk={c['topk']} page={c['page_size']}")
    print(f"  pages assigned by the host during decoding: {r['pages_assigned']}; final lengths {r['final_lens']}")
    print(f"  eager step          {r['eager_ms']:9.3f} ms")
    if "graph_ms" in r:
        print(f"  CUDA-graph replay   {r['graph_ms']:9.3f} ms   (capture {r['graph_capture_ms']:.1f} ms, "
              f"speed-up x{r['eager_ms'] / r['graph_ms']:.1f})")
        print(f"    replay vs eager: max rel err over tokens {r['graph_rel_err']:.2e}, max abs err "
              f"{r['graph_max_abs_err']:.2e}, bitwise equal: {r['graph_bitwise_equal']}, "
              f"cache rel err {r['graph_cache_err']:.2e}")
    if "compiled_ms" in r:
        graphs = ("reduce-overhead, CUDA graphs skipped!" if r["compiled_cudagraph_skips"] else
                  "reduce-overhead: CUDA graphs") if r["device"].startswith("cuda") else "no graphs on CPU"
        print(f"  torch.compile step  {r['compiled_ms']:9.3f} ms   ({graphs})")
        print(f"    compiled vs eager: max rel err over tokens {r['compiled_rel_err']:.2e}, max abs err "
              f"{r['compiled_max_abs_err']:.2e}, cache rel err {r['compiled_cache_err']:.2e}")


# Replay / compiled vs eager, relative error per token: SPEC section 9's forward bound for bf16 outputs; fp32
# (the CPU) allows reordered sums only.
TOLERANCES = {"bfloat16": 1e-2, "float32": 1e-4}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="tokens to decode (default 64 on GPU, 24 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="sequences (default 8 on GPU, 3 on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true", help="also run the step under torch.compile")
    p.add_argument("--tiny", action="store_true", help="the tiny CPU layer sizes on any device")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    cfg = TINY if (a.tiny or not on_cuda) else GPU
    if not on_cuda:
        torch.set_num_threads(1)  # tiny tensors: a second OpenMP thread only adds sync overhead
    r = run_decode(steps=a.steps or (64 if on_cuda else 24), batch=a.batch or (8 if on_cuda else 3),
                   device=str(device), cfg=cfg, compile=a.compile or not on_cuda, verbose=True)
    tolerance = TOLERANCES[r["dtype"]]
    errors = [r[k] for k in ("graph_rel_err", "compiled_rel_err", "graph_cache_err", "compiled_cache_err")
              if k in r]
    ok = all(e <= tolerance for e in errors) and r.get("compiled_cudagraph_skips", 0) == 0
    if on_cuda:
        check_no_host_sync(TINY if a.tiny else cfg, batch=min(r["batch"], 4))
        print("  one eager step under torch.cuda.set_sync_debug_mode('error'): no host sync")
    print("all checks passed" if ok else f"CHECK FAILED: an error exceeds {tolerance} (or CUDA graphs were skipped)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
