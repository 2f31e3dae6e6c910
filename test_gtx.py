"""Tests for gtx: a Transformer layer is graph attention on a complete graph.

Three layers, each trusting only the one before it:
  1. float64 central differences check every gradient of every backend;
  2. the three backends agree on corner-case and random graphs;
  3. on complete / causal graphs the layer equals textbook (GPT-style) attention.
Then: attention-weight invariants, stability, bad input, positional encodings,
per-edge bias, a small training run, the Transformer block (against central differences, the
backends, a textbook layer and torch), bench.py's GPT, and the benchmark smoke test.
"""
import json
import math
import os
import re
import subprocess
import sys
import time

import numba
import numpy as np
import psutil
import pytest

import gtx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (bench.py: the benchmark, its learning experiment and its GPT)
BACKENDS = gtx.BACKENDS
# textbook's P V over all pairs lets 0 * NaN through non-edges, as a Transformer's matmuls do (gtx.py
# says so): an inf or NaN input reaches more there than in the others
NAN_SAFE = ["naive", "dense", "sparse"]
F64, F32 = np.float64, np.float32
PARAM_KEYS = ("Wq", "Wk", "Wv", "bq", "bk", "bv", "Wo", "bo")
BAD = (ValueError, TypeError)

# Tolerances, relative to the largest entry of the reference tensor.
RTOL = {F64: 1e-10, F32: 1e-4}          # backend vs backend (float32: vs float64 on the same inputs)
ATOL = {F64: 1e-14, F32: 1e-6}          # floor for gradients that are exactly 0 in exact arithmetic (inputs are O(1))
FD_EPS, FD_RTOL, FD_ATOL = 1e-6, 1e-6, 1e-8   # float64 central differences, every entry of every tensor


def assert_close(name, got, want, rtol, atol=0.0):
    """max|got - want| <= rtol * max|want| + atol, with a message naming the tensor."""
    got, want = np.asarray(got, F64), np.asarray(want, F64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, want {want.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    if got.size == 0:
        return
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= rtol * scale + atol, (
        f"{name}: max abs err {err:.3g}, max rel err {err / scale if scale else np.inf:.3g} "
        f"(relative to max|want| = {scale:.3g}; rtol {rtol:g}, atol {atol:g})")


# ---------------------------------------------------------------- helpers

def make_graph(edges, n):
    """Graph from a list of (source j, target i) pairs."""
    return gtx.Graph(np.array(edges, dtype=np.int64).reshape(-1, 2).T, n)


def star(n):
    """Hub 0 receives from and sends to every leaf."""
    return [(j, 0) for j in range(1, n)] + [(0, j) for j in range(1, n)]


def shuffled_random_graph(n, avg_degree, seed):
    g = gtx.random_graph(n, avg_degree=avg_degree, rng=seed)
    perm = np.random.default_rng(seed).permutation(g.num_edges)
    return gtx.Graph(g.edge_index[:, perm], n)


# Small graph for gradient checks: self-loop at 0, node 3 has only an out-edge, node 4 is isolated.
FD_EDGES = [(0, 0), (1, 0), (2, 0), (0, 1), (3, 1), (1, 2), (0, 2), (2, 1)]

GRAPHS = {
    "single_node": lambda: make_graph([], 1),
    "single_self_loop": lambda: make_graph([(0, 0)], 1),
    "self_loops_only": lambda: make_graph([(i, i) for i in range(4)], 4),
    "no_edges": lambda: make_graph([], 5),
    "empty_N0": lambda: make_graph([], 0),
    "isolated_nodes": lambda: make_graph([(0, 1), (1, 2), (2, 0), (1, 1)], 6),
    "components": lambda: make_graph([(0, 1), (1, 0), (2, 3), (3, 4), (4, 2), (5, 5), (6, 5)], 8),
    "star_hub": lambda: make_graph(star(60), 60),
    "complete": lambda: gtx.complete_graph(12),
    "complete_no_self_loops": lambda: gtx.complete_graph(9, self_loops=False),
    "causal": lambda: gtx.causal_graph(10),
    "window": lambda: gtx.causal_graph(11, window=3),
    "batch": lambda: gtx.batch_graphs([gtx.complete_graph(3), gtx.causal_graph(5, window=2),
                                       gtx.complete_graph(1), gtx.complete_graph(4, self_loops=False)]),
    "batch_mixed": lambda: gtx.batch_graphs([gtx.complete_graph(3), make_graph([(0, 1), (2, 1)], 4),
                                             gtx.causal_graph(3)]),
    "batch_complete": lambda: gtx.batch_graphs([gtx.complete_graph(n) for n in (3, 5, 4)]),   # molecules'
    **{f"random{s}": (lambda s=s: shuffled_random_graph(25, 4, s)) for s in range(3)},
}


def make_inputs(g, D=6, H=2, dh=4, dtype=F64, seed=0, bias=True):
    """x, params (with non-zero biases), dy and edge_bias for graph g."""
    rng = np.random.default_rng(seed)
    p = gtx.init_params(D, H, dh, rng=seed, dtype=F64)
    for k in ("bq", "bk", "bv", "bo"):
        p[k] = 0.5 * rng.standard_normal(p[k].shape)
    x = rng.standard_normal((g.num_nodes, D))
    dy = rng.standard_normal((g.num_nodes, D))
    eb = rng.standard_normal((g.num_edges, H)) if bias else None
    return astype(dtype, x, p, dy, eb)


def astype(dtype, x, p, dy, eb):
    def cast(a):
        if a is None:
            return None
        return a.astype(dtype)
    return cast(x), {k: cast(v) for k, v in p.items()}, cast(dy), cast(eb)


def run(backend, g, x, p, dy, eb=None):
    """Forward + backward; every output in one dict."""
    y, cache = gtx.forward(x, g, p, backend=backend, edge_bias=eb)
    dx, grads = gtx.backward(dy, cache)
    return {"y": y, "alpha": gtx.attention_weights(cache), "dx": dx,
            **{"d" + k: v for k, v in grads.items()}}


def edge_scores(g, x, p, eb=None):
    """s[e, h] = <q[i_e], k[j_e]> / sqrt(dh) (+ edge_bias), computed independently of gtx."""
    q = np.einsum("nd,dhk->nhk", x, p["Wq"]) + p["bq"]
    k = np.einsum("nd,dhk->nhk", x, p["Wk"]) + p["bk"]
    j, i = g.edge_index
    s = np.einsum("ehk,ehk->eh", q[i], k[j]) / np.sqrt(q.shape[-1])
    return s if eb is None else s + eb


# ---------------------------------------------------------------- 1. gradients

def central_differences(loss, a, entries=None):
    """d loss / d a by float64 central differences, each entry of a perturbed in place (our own
    copies) and restored: shaped as a, or at the given flat entries only."""
    numeric = np.empty(a.size)
    for f in range(a.size) if entries is None else entries:
        old = a.flat[f]
        a.flat[f] = old + FD_EPS
        lp = loss()
        a.flat[f] = old - FD_EPS
        lm = loss()
        a.flat[f] = old
        numeric[f] = (lp - lm) / (2 * FD_EPS)
    return numeric.reshape(a.shape) if entries is None else numeric[entries]


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "edge_bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_central_differences(backend, bias):
    g = make_graph(FD_EDGES, 5)
    x, p, dy, eb = make_inputs(g, bias=bias)
    out = run(backend, g, x, p, dy, eb)
    assert ("dedge_bias" in out) == bias

    def loss():  # weighted loss sum(y * dy): every output entry matters with its own weight
        y, _ = gtx.forward(x, g, p, backend=backend, edge_bias=eb)
        return np.sum(y * dy)

    tensors = {"x": x, **p, **({"edge_bias": eb} if bias else {})}
    for name, a in tensors.items():
        assert_close(f"{backend} d{name}", out["d" + name], central_differences(loss, a), FD_RTOL, FD_ATOL)


# ---------------------------------------------------------------- 2. backends agree

@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "edge_bias"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("graph", GRAPHS)
def test_backends_agree(graph, dtype, bias):
    g = GRAPHS[graph]()
    x, p, dy, eb = make_inputs(g, dtype=dtype, seed=2, bias=bias)
    ref = run("naive", g, *astype(F64, x, p, dy, eb))   # float64 reference on the very same inputs
    for backend in BACKENDS:
        out = run(backend, g, x, p, dy, eb)
        assert out.keys() == ref.keys()
        for k in ref:
            assert out[k].dtype == dtype, f"{backend} {k}: dtype {out[k].dtype}"
            assert_close(f"{backend} {k}", out[k], ref[k], RTOL[dtype], ATOL[dtype])


# ---------------------------------------------------------------- 3. textbook attention

def textbook_attention(x, p, causal=False):
    """softmax(Q K^T / sqrt(dh)) V per head, heads concatenated, output projection (as in PyTorch)."""
    D, H, dh = p["Wq"].shape
    N = x.shape[0]

    def heads(W, b):  # (N, D) -> (H, N, dh)
        return (x @ W.reshape(D, H * dh) + b.reshape(H * dh)).reshape(N, H, dh).transpose(1, 0, 2)

    Q, K, V = heads(p["Wq"], p["bq"]), heads(p["Wk"], p["bk"]), heads(p["Wv"], p["bv"])
    S = Q @ K.transpose(0, 2, 1) / np.sqrt(dh)
    if causal:  # GPT: position i sees positions j <= i
        S = np.where(np.triu(np.ones((N, N), bool), k=1), -np.inf, S)
    A = np.exp(S - S.max(-1, keepdims=True))
    A /= A.sum(-1, keepdims=True)
    O = (A @ V).transpose(1, 0, 2).reshape(N, H * dh)
    return O @ p["Wo"].reshape(H * dh, D) + p["bo"], A


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_textbook_attention(backend, causal):
    n = 11
    g = gtx.causal_graph(n) if causal else gtx.complete_graph(n, self_loops=True)
    x, p, _, _ = make_inputs(g, D=8, H=2, dh=4, seed=3, bias=False)
    y, cache = gtx.forward(x, g, p, backend=backend)
    y_ref, A = textbook_attention(x, p, causal)
    j, i = g.edge_index
    assert_close(f"{backend} y", y, y_ref, 1e-10)
    assert_close(f"{backend} alpha", gtx.attention_weights(cache), A[:, i, j].T, 1e-10)


def test_graph_constructors():
    ei = np.array([[0, 2, 1], [1, 1, 0]])
    g = gtx.Graph(ei, 3)
    assert (g.num_nodes, g.num_edges, g.num_edges == g.num_nodes ** 2) == (3, 3, False)
    ei[0, 0] = 1                                   # Graph keeps its own read-only copy
    assert g.edge_index.tolist() == [[0, 2, 1], [1, 1, 0]]
    assert not g.edge_index.flags.writeable

    edges = lambda g: set(zip(*g.edge_index.tolist()))
    n = 5
    assert gtx.complete_graph(n).num_edges == n * n
    assert edges(gtx.complete_graph(n)) == {(j, i) for j in range(n) for i in range(n)}
    assert gtx.complete_graph(n, self_loops=False).num_edges == n * n - n
    assert edges(gtx.complete_graph(n, self_loops=False)) == {(j, i) for j in range(n) for i in range(n) if j != i}
    assert edges(gtx.causal_graph(n)) == {(j, i) for i in range(n) for j in range(i + 1)}


def test_random_graph():
    g = gtx.random_graph(50, avg_degree=3, rng=0)
    j, i = g.edge_index
    assert g.num_edges == 150
    assert not np.any(j == i), "self-loop"
    assert len(set(zip(j.tolist(), i.tolist()))) == g.num_edges, "duplicate edge"
    assert np.any(np.diff(i) < 0), "edge order should be shuffled, not sorted by target"
    assert np.array_equal(g.edge_index, gtx.random_graph(50, avg_degree=3, rng=0).edge_index)
    assert gtx.random_graph(20, density=0.25, rng=np.random.default_rng(1)).num_edges == 100
    for kw in ({}, {"avg_degree": 3, "density": 0.1}):
        with pytest.raises(ValueError):
            gtx.random_graph(20, **kw)


def test_init_params():
    D, H = 12, 3
    p = gtx.init_params(D, H, rng=0)
    dh = D // H
    assert set(p) == set(PARAM_KEYS)
    for k, shape in {"Wq": (D, H, dh), "Wk": (D, H, dh), "Wv": (D, H, dh), "bq": (H, dh), "bk": (H, dh),
                     "bv": (H, dh), "Wo": (H, dh, D), "bo": (D,)}.items():
        assert p[k].shape == shape and p[k].dtype == F64, k
    for k in PARAM_KEYS:
        assert np.array_equal(p[k], gtx.init_params(D, H, rng=0)[k]), f"{k} not deterministic"
        if k.startswith("b"):
            assert not p[k].any(), f"{k} should start at zero"
        else:  # Glorot-uniform: |w| <= sqrt(6 / (fan_in + fan_out)); q, k, v stacked as torch's in_proj
            fan = D + (H * dh if k == "Wo" else 3 * H * dh)
            assert np.sqrt(6 / fan) / 2 < np.abs(p[k]).max() <= np.sqrt(6 / fan), k
    assert not np.array_equal(p["Wq"], gtx.init_params(D, H, rng=1)["Wq"])
    for bad in ((8, 0), (8, 16), (8.0, 2), (True, 2), (8, 2, 0)):
        with pytest.raises(ValueError, match="init_params"):
            gtx.init_params(*bad)
    assert gtx.init_params(D, H, d_head=5, rng=0, dtype=F32)["Wo"].shape == (H, 5, D)
    assert all(a.dtype == F32 for a in gtx.init_params(D, H, rng=0, dtype=F32).values())


# ---------------------------------------------------------------- attention weights, corner cases, stability

@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_weights_are_per_target_softmax(backend):
    g = shuffled_random_graph(30, 1.5, seed=4)     # sparse enough that some nodes have no in-edges
    x, p, _, eb = make_inputs(g, seed=4)
    _, cache = gtx.forward(x, g, p, backend=backend, edge_bias=eb)
    alpha = gtx.attention_weights(cache)
    j, i = g.edge_index
    s = edge_scores(g, x, p, eb)
    want = np.empty_like(s)
    for t in np.unique(i):                        # softmax over the edges into target t
        e = np.exp(s[i == t] - s[i == t].max(0))
        want[i == t] = e / e.sum(0)
    assert (alpha >= 0).all()
    sums = np.zeros((g.num_nodes, alpha.shape[1]))
    np.add.at(sums, i, alpha)
    has_in = np.bincount(i, minlength=g.num_nodes) > 0
    assert not has_in.all(), "test graph should have nodes without in-edges"
    assert_close("alpha sum per target", sums[has_in], np.ones_like(sums[has_in]), 1e-12)
    assert_close("alpha in input edge order", alpha, want, 1e-10)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nodes_without_in_edges_output_bo(backend, dtype):
    g = make_graph(FD_EDGES, 5)                   # node 3: out-edge only, node 4: isolated
    x, p, dy, eb = make_inputs(g, dtype=dtype, seed=5)
    out = run(backend, g, x, p, dy, eb)
    assert np.array_equal(out["y"][3:], np.stack([p["bo"], p["bo"]]))
    assert all(np.isfinite(v).all() for v in out.values())
    assert not out["dx"][4].any(), "isolated node's features reach nothing"

    g0 = make_graph([], 4)                        # E = 0: every node outputs bo, nothing flows back
    x, p, dy, _ = make_inputs(g0, dtype=dtype, seed=5, bias=False)
    out = run(backend, g0, x, p, dy)
    assert np.array_equal(out["y"], np.tile(p["bo"], (4, 1)))
    assert out["alpha"].shape == (0, 2)
    assert_close("dbo", out["dbo"], dy.sum(0), RTOL[dtype])
    for k in ("dx", "dWq", "dWk", "dWv", "dbq", "dbk", "dbv", "dWo"):
        assert not out[k].any() and np.isfinite(out[k]).all(), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_float32(backend):
    g = shuffled_random_graph(20, 4, seed=6)
    x, p, dy, _ = make_inputs(g, D=8, H=2, dh=4, seed=6, bias=False)
    p["Wq"] *= 30
    p["Wk"] *= 30
    # Per-target offsets of +-1e4: a global (not per-target) max would underflow whole rows to 0/0.
    eb = np.where(g.edge_index[1] % 2 == 0, 1e4, -1e4)[:, None] * np.ones(2)
    s = edge_scores(g, x, p, eb)
    assert 5e3 < np.abs(s).max() < 1e5 and np.abs(s - eb).max() > 1e3, "scores should be around +-1e4"
    inputs32 = astype(F32, x, p, dy, eb)
    ref = run("naive", g, *astype(F64, *inputs32))
    out = run(backend, g, *inputs32)
    for k in ref:  # atol: saturated softmax makes the score gradients ~0 in float64, round-off in float32
        assert_close(f"{backend} {k}", out[k], ref[k], 1e-3, atol=1e-3)


@pytest.mark.filterwarnings("ignore:invalid value encountered")   # NaN inputs: expected
@pytest.mark.parametrize("backend", NAN_SAFE)
def test_nan_does_not_reach_nodes_that_do_not_attend_to_it(backend):
    g = make_graph([(0, 1), (1, 2), (2, 0), (3, 0), (4, 4), (1, 4), (5, 5)], 6)   # only node 0 attends to 3
    x, p, _, _ = make_inputs(g, seed=7, bias=False)
    y_clean, _ = gtx.forward(x, g, p, backend=backend)
    x[3] = np.nan
    y, _ = gtx.forward(x, g, p, backend=backend)
    assert np.isnan(y[0]).all(), f"{backend}: node 0 attends to the NaN node, so its output is NaN"
    assert_close(f"{backend} y of nodes not attending to the NaN node", y[1:], y_clean[1:], 1e-12)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_all_minus_inf_bias_masks_a_target(dtype):
    """A bias of -inf on every in-edge of a target (a mask) gives it zero weights and o = 0, like no in-edges."""
    g = make_graph(FD_EDGES, 5)
    x, p, dy, eb = make_inputs(g, dtype=dtype, seed=11)
    eb[g.edge_index[1] == 0, 0] = -np.inf               # head 0 of node 0: every in-edge masked
    eb[g.edge_index[1] == 1, 1] = -np.inf               # head 1 of node 1
    masked = np.isinf(eb)
    outs = {b: run(b, g, x, p, dy, eb) for b in BACKENDS}
    for b, out in outs.items():
        assert all(np.isfinite(v).all() for v in out.values()), f"{b}: non-finite output"
        assert not out["alpha"][masked].any(), f"{b}: masked weights should be 0"
        assert not out["dedge_bias"][masked].any(), f"{b}: masked biases should get no gradient"
        for k in out:
            assert_close(f"{b} {k}", out[k], outs["naive"][k], RTOL[dtype], ATOL[dtype])


def test_dense_memory_guard(monkeypatch):
    g = gtx.random_graph(300, avg_degree=3, rng=0)          # dense's blocks: mostly non-edges
    x, p, _, _ = make_inputs(g, bias=False)
    need = gtx.dense_bytes(g, 2, 4, F64)
    R, C = max((b.R, b.C) for b in gtx.dense_blocks(g))
    assert need >= 2 * R * C * 8, "at least one block's scores for each of the 2 heads, float64"
    assert need > gtx.sparse_bytes(g, 2, 4, F64), "sparse needs less here"
    assert gtx.dense_bytes(gtx.complete_graph(600), 2, 4, F64) > need
    gtx.release_buffers()                         # none held: a call's buffers count as new
    monkeypatch.setattr(gtx, "available_bytes", lambda: need - 1)
    with pytest.raises(MemoryError, match="sparse"):
        gtx.forward(x, g, p, backend="dense")
    gtx.forward(x, g, p, backend="sparse")        # the suggested way out works
    monkeypatch.setattr(gtx, "available_bytes", lambda: need)
    gtx.forward(x, g, p, backend="dense")         # exactly enough memory: runs
    monkeypatch.setattr(gtx, "available_bytes", lambda: need - gtx._held_bytes("dense") - 1)
    with pytest.raises(MemoryError, match="sparse"):
        gtx.forward(x, g, p, backend="dense")     # the buffers it holds are not counted twice
    eb = np.zeros((g.num_edges, 2))
    assert gtx.dense_bytes(g, 2, 4, F64, edge_bias=True) > need, "an edge bias costs more memory"
    gtx.release_buffers()
    monkeypatch.setattr(gtx, "available_bytes", lambda: need)
    with pytest.raises(MemoryError, match="sparse"):
        gtx.forward(x, g, p, backend="dense", edge_bias=eb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_gives_the_same_result(backend):
    g = make_graph(FD_EDGES, 5)
    x, p, dy, eb = make_inputs(g, seed=8)
    _, cache = gtx.forward(x, g, p, backend=backend, edge_bias=eb)
    dx1, g1 = gtx.backward(dy, cache)
    dx2, g2 = gtx.backward(dy, cache)
    assert np.array_equal(dx1, dx2)
    assert g1.keys() == g2.keys() and all(np.array_equal(g1[k], g2[k]) for k in g1)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_matmuls_match_matmul(dtype):
    """The projections' threaded products, on shapes that are cut (tall, wide) and not cut, alone
    and two at once, into a new array or a given one, with and without a row added."""
    rng = np.random.default_rng(11)
    for m, k, n in ((5000, 63, 153), (63, 5000, 64), (3, 3, 3), (0, 8, 4), (8, 0, 4)):
        a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
        add, out = rng.standard_normal(n).astype(dtype), np.full((m, n), np.nan, dtype)
        want = a.astype(F64) @ b.astype(F64)
        got, got_add = gtx._matmuls(gtx.Product(a, b), gtx.Product(a, b, out, add))
        assert got.dtype == dtype, f"_matmuls {(m, k, n)}: dtype {got.dtype}, want {dtype}"
        assert np.shares_memory(got_add, out) or not out.size, f"_matmuls {(m, k, n)}: not in out"
        assert_close(f"_matmuls {(m, k, n)}", got, want, RTOL[dtype])
        assert_close(f"_matmuls {(m, k, n)} + add", got_add, want + add, RTOL[dtype])


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_engine_is_deterministic(backend):
    """The same bits across calls and for 1 thread or all: dense's backward units own the dk, dv
    rows they write, sparse sums each node on one thread."""
    threads = numba.get_num_threads()
    if threads < 2:
        pytest.skip("needs 2 or more Numba threads to compare thread counts")
    cases = [(gtx.random_graph(300, avg_degree=8, rng=9), 16, 4, 8, F32), (make_graph(star(300), 300), 16, 4, 8, F32),
             (gtx.random_graph(3, avg_degree=1, rng=9), 3, 1, 3, F64), (gtx.causal_graph(257, window=33), 32, 4, 8, F32),
             (gtx.complete_graph(300), 16, 4, 4, F32),
             (gtx.random_graph(4500, avg_degree=4, rng=9), 63, 3, 17, F64)]   # long enough to cut the matmuls
    for g, D, H, dh, dtype in cases:
        x, p, dy, eb = make_inputs(g, D=D, H=H, dh=dh, dtype=dtype, seed=9)
        a, b = run(backend, g, x, p, dy, eb), run(backend, g, x, p, dy, eb)
        numba.set_num_threads(1)
        try:
            c = run(backend, g, x, p, dy, eb)
        finally:
            numba.set_num_threads(threads)
        for k in a:
            assert np.array_equal(a[k], b[k]), f"{backend} {k} not bit-identical across calls"
            assert np.array_equal(a[k], c[k]), (f"{backend} {k} differs between {threads} threads and 1 by "
                                                f"{np.abs(a[k] - c[k]).max()}")


@pytest.mark.parametrize("graph", ["complete300", "complete600", "complete1500", "causal", "window", "random",
                                   "molecules"])
def test_dense_plan_keeps_every_thread_busy(graph, monkeypatch):
    """On 2 threads, each thread's share of a plan's work (pairs times heads) is within 10% of the
    mean wherever there are 2 units per thread or more; each block is in one unit per head. (On 3,
    a forward of few blocks, as complete_graph(300)'s, is not yet: its rows are not split.)"""
    g = {"complete300": lambda: gtx.complete_graph(300), "complete600": lambda: gtx.complete_graph(600),
         "complete1500": lambda: gtx.complete_graph(1500), "causal": lambda: gtx.causal_graph(4096),
         "window": lambda: gtx.causal_graph(5000, window=128),
         "random": lambda: gtx.random_graph(3000, avg_degree=16, rng=3),
         "molecules": lambda: gtx.batch_graphs([gtx.complete_graph(int(n)) for n in
                                                np.random.default_rng(0).integers(15, 36, 300)])}[graph]()
    for threads in (2,):
        monkeypatch.setattr(gtx.nb, "get_num_threads", lambda: threads)
        plan = gtx._plan(g, 4, 16)
        for part in ("forward", "backward"):
            runs = getattr(plan, part)
            assert len(runs) == threads
            covered = sorted((h, n) for run in runs for heads, group in run for n in group
                             for h in range(heads.start, heads.stop))
            assert covered == [(h, n) for h in range(4) for n in range(len(plan.blocks))], f"{part}: not each once"
            load = [sum((h.stop - h.start) * sum(plan.blocks[n].R * plan.blocks[n].C for n in group)
                        for h, group in run) for run in runs]
            if sum(len(run) for run in runs) >= 2 * threads:
                assert max(abs(w / np.mean(load) - 1) for w in load) <= 0.10, f"{graph} {part} {threads}: {load}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_mutated(backend):
    ei = np.array(FD_EDGES).T.copy()
    g = gtx.Graph(ei, 5)
    x, p, dy, eb = make_inputs(g, seed=10)
    before = [a.copy() for a in (ei, g.edge_index, x, dy, eb, *p.values())]
    _, cache = gtx.forward(x, g, p, backend=backend, edge_bias=eb)
    gtx.backward(dy, cache)
    gtx.attention_weights(cache)
    after = (ei, g.edge_index, x, dy, eb, *p.values())
    names = ("edge_index", "g.edge_index", "x", "dy", "edge_bias", *p)
    for name, a, b in zip(names, before, after):
        assert np.array_equal(a, b), f"{backend} mutated {name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_do_not_share_memory_with_later_calls(backend):
    """gtx reuses buffers between calls: nothing it returns may point into them."""
    g = gtx.causal_graph(7, window=3)
    x, p, dy, eb = make_inputs(g, seed=28)
    first = run(backend, g, x, p, dy, eb)
    kept = {k: v.copy() for k, v in first.items()}
    run(backend, g, 2 * x, p, -dy, 3 * eb)                          # other inputs: other results
    for k in first:
        assert np.array_equal(first[k], kept[k]), f"{backend} {k} changed by a later call"


@pytest.mark.parametrize("graph", ["fd", "complete"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_weights_are_a_copy(backend, graph):
    g = make_graph(FD_EDGES, 5) if graph == "fd" else gtx.complete_graph(5)
    x, p, dy, _ = make_inputs(g, seed=27, bias=False)
    _, cache = gtx.forward(x, g, p, backend=backend)
    before = gtx.backward(dy, cache)[0]
    gtx.attention_weights(cache)[:] = 7                # the caller's to change: the cache is untouched
    assert np.array_equal(gtx.backward(dy, cache)[0], before), f"{backend}: alpha shared with the cache"


# ---------------------------------------------------------------- bad input

BAD_GRAPHS = {
    "not_2xE": (np.zeros((3, 2), np.int64), 4, "edge_index"),
    "1d": (np.zeros(4, np.int64), 4, "edge_index"),
    "float": (np.array([[0.0, 1.0], [1.0, 2.0]]), 4, "edge_index"),
    "negative_index": (np.array([[0, -1, 2], [1, 2, 3]]), 4, "column 1"),
    "index_too_large": (np.array([[0, 1, 2, 9], [1, 4, 3, 1]]), 4, "column 1"),
    "duplicate": (np.array([[0, 2, 0, 2], [1, 1, 1, 1]]), 4, r"duplicate edge.*\(0, 1\)"),
    "negative_num_nodes": (np.zeros((2, 0), np.int64), -1, "num_nodes"),
}


@pytest.mark.parametrize("case", BAD_GRAPHS)
def test_bad_graph(case):
    edge_index, n, message = BAD_GRAPHS[case]
    with pytest.raises(BAD, match=message):
        gtx.Graph(edge_index, n)


# Each case edits the arguments of a valid forward call: (edit, regex the error message must match).
def _set(key, fn):
    return lambda a: a.update({key: fn(a)})


def _param(key, fn):
    return lambda a: a.update(params={**a["params"], key: fn(a["params"][key])})


BAD_FORWARD = {
    "x_rows": (_set("x", lambda a: a["x"][:-1]), r"\bx\b"),
    "x_1d": (_set("x", lambda a: a["x"].ravel()), r"\bx\b"),
    "x_int": (_set("x", lambda a: a["x"].astype(np.int64)), "dtype|float"),
    "x_float32_params_float64": (_set("x", lambda a: a["x"].astype(F32)), "dtype|float"),
    "Wv_float32": (_param("Wv", lambda w: w.astype(F32)), "dtype|float|Wv"),
    "params_not_dict": (_set("params", lambda a: list(a["params"].values())), "params"),
    "params_missing_Wo": (_set("params", lambda a: {k: v for k, v in a["params"].items() if k != "Wo"}), "Wo"),
    "Wq_width": (_param("Wq", lambda w: w[:-1]), r"Wq|\bx\b"),
    "Wk_head_size": (_param("Wk", lambda w: w[..., :-1]), "Wk"),
    "bq_shape": (_param("bq", lambda b: b[:, :-1]), "bq"),
    "Wo_shape": (_param("Wo", lambda w: w[:, :, :-1]), "Wo"),
    "bo_shape": (_param("bo", lambda b: b[:-1]), "bo"),
    "graph_not_Graph": (_set("g", lambda a: a["g"].edge_index), "Graph"),
    "edge_bias_heads": (_set("edge_bias", lambda a: a["edge_bias"][:, :1]), "edge_bias"),
    "edge_bias_rows": (_set("edge_bias", lambda a: a["edge_bias"][:-1]), "edge_bias"),
    "edge_bias_1d": (_set("edge_bias", lambda a: a["edge_bias"][:, 0]), "edge_bias"),
    "edge_bias_float32": (_set("edge_bias", lambda a: a["edge_bias"].astype(F32)), "edge_bias"),
    "edge_bias_int": (_set("edge_bias", lambda a: a["edge_bias"].astype(np.int64)), "edge_bias"),
}


@pytest.mark.parametrize("case", BAD_FORWARD)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_forward_input(backend, case):
    g = make_graph(FD_EDGES, 5)
    x, p, _, eb = make_inputs(g)
    args = {"x": x, "g": g, "params": p, "edge_bias": eb}
    before = [a.copy() for a in (x, eb, *p.values())]
    edit, message = BAD_FORWARD[case]
    edit(args)
    with pytest.raises(BAD, match=message):
        gtx.forward(args["x"], args["g"], args["params"], backend=backend, edge_bias=args["edge_bias"])
    assert all(np.array_equal(a, b) for a, b in zip(before, (x, eb, *p.values()))), "inputs mutated"


def test_backward_and_attention_weights_want_a_cache():
    g = make_graph(FD_EDGES, 5)
    x, p, dy, _ = make_inputs(g)
    out = gtx.forward(x, g, p)
    for bad in (out, out[0]):                     # the (y, cache) pair, or y itself
        with pytest.raises(TypeError, match="cache"):
            gtx.backward(dy, bad)
        with pytest.raises(TypeError, match="cache"):
            gtx.attention_weights(bad)


def test_unknown_backend_lists_the_valid_ones():
    g = make_graph(FD_EDGES, 5)
    x, p, _, _ = make_inputs(g)
    with pytest.raises(ValueError, match="cuda") as e:
        gtx.forward(x, g, p, backend="cuda")
    assert all(b in str(e.value) for b in BACKENDS), str(e.value)


@pytest.mark.parametrize("bad_dy", ["rows", "cols", "float32", "int"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_dy(backend, bad_dy):
    g = make_graph(FD_EDGES, 5)
    x, p, dy, _ = make_inputs(g)
    _, cache = gtx.forward(x, g, p, backend=backend)
    dy = {"rows": dy[:-1], "cols": dy[:, :-1], "float32": dy.astype(F32),
          "int": dy.astype(np.int64)}[bad_dy]
    with pytest.raises(BAD, match="dy"):
        gtx.backward(dy, cache)



# ---------------------------------------------------------------- structured graphs, dense blocks

def attention_core(backend, g, q, k, v, bias, do, **kw):
    """One backend's attention alone, as a lifted backend is used: o and the gradients."""
    be = gtx.BACKENDS[backend]
    o, cache = be.forward(q, k, v, bias, g, **kw)
    dq, dk, dv = (np.full_like(q, np.nan) for _ in range(3))      # the backend must write every entry
    ds = be.backward(do, cache, dq, dk, dv)
    out = dict(o=o, dq=dq, dk=dk, dv=dv)
    return out if bias is None else dict(out, ds=ds)


def core_inputs(g, H=2, dh=3, seed=0, bias=True, dtype=F64):
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal((g.num_nodes, H, dh)).astype(dtype) for _ in range(4))
    return q, k, v, (rng.standard_normal((g.num_edges, H)).astype(dtype) if bias else None), do


STRUCTURED = {
    "complete": lambda: gtx.complete_graph(7),
    "complete_no_self_loops": lambda: gtx.complete_graph(6, self_loops=False),
    "causal": lambda: gtx.causal_graph(9),
    "window": lambda: gtx.causal_graph(12, window=4),
    "batch": lambda: gtx.batch_graphs([gtx.complete_graph(3), gtx.causal_graph(6, window=2),
                                       gtx.complete_graph(1), gtx.causal_graph(4)]),
    "batch_no_self_loops": lambda: gtx.batch_graphs([gtx.complete_graph(n, self_loops=False) for n in (2, 5, 3)]),
}


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "edge_bias"])
@pytest.mark.parametrize("graph", STRUCTURED)
def test_structured_graph_equals_its_edge_list(graph, bias):
    g = STRUCTURED[graph]()
    assert g.ranges is not None, "a structured graph keeps no edge list until asked"
    explicit = gtx.Graph(g.edge_index, g.num_nodes)                # edge_index is built here, on first use
    assert explicit.num_edges == g.num_edges
    assert np.array_equal(gtx._csr(explicit).perm, np.arange(g.num_edges)), "structured edges come in CSR order"
    x, p, dy, eb = make_inputs(g, seed=20, bias=bias)
    for backend in BACKENDS:
        a, b = run(backend, g, x, p, dy, eb), run(backend, explicit, x, p, dy, eb)
        for key in a:
            assert_close(f"{graph} {backend} {key}", a[key], b[key], 1e-12, 1e-14)


def test_structured_constructors():
    g = gtx.complete_graph(10**6)                                   # 10^12 edges: never listed
    assert (g.num_nodes, g.num_edges, g.num_edges == g.num_nodes ** 2) == (10**6, 10**12, True)
    assert gtx.complete_graph(10**6, self_loops=False).num_edges == 10**12 - 10**6
    assert gtx.causal_graph(10**6).num_edges == 10**6 * (10**6 + 1) // 2
    w = gtx.causal_graph(6, window=3)
    assert w.edge_index.tolist() == [[0, 0, 1, 0, 1, 2, 1, 2, 3, 2, 3, 4, 3, 4, 5],
                                     [0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]]
    assert not w.edge_index.flags.writeable
    b = gtx.batch_graphs([gtx.complete_graph(2), make_graph([(0, 1)], 3), gtx.complete_graph(1)])
    assert b.ptr.tolist() == [0, 2, 5, 6] and b.num_edges == 4 + 1 + 1
    assert b.edge_index.tolist() == [[0, 1, 0, 1, 2, 5], [0, 0, 1, 1, 3, 5]], "parts' order, ids offset"
    assert gtx.batch_graphs([gtx.complete_graph(2), gtx.causal_graph(3)]).ranges is not None
    for bad, kw in ((-1, {}), (1.5, {}), (3, {"window": 0})):
        with pytest.raises(BAD):
            gtx.causal_graph(bad, **kw)
    with pytest.raises(TypeError, match="Graph"):
        gtx.batch_graphs([gtx.complete_graph(2), np.zeros((2, 0))])


BLOCK_GRAPHS = {**STRUCTURED, "fd": lambda: make_graph(FD_EDGES, 5), "star": lambda: make_graph(star(20), 20),
                "random": lambda: shuffled_random_graph(23, 3, 21), "no_edges": lambda: make_graph([], 4),
                "batch_mixed": GRAPHS["batch_mixed"]}


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "edge_bias"])
@pytest.mark.parametrize("graph", BLOCK_GRAPHS)
def test_dense_result_does_not_depend_on_block_size(graph, bias):
    g = BLOCK_GRAPHS[graph]()
    inputs = core_inputs(g, seed=22, bias=bias)
    ref = attention_core("naive", g, *inputs)
    for rows in (1, 3, 4, g.num_nodes + 5, None):                   # 3 divides none of the sizes
        out = attention_core("dense", g, *inputs, block_rows=rows)
        for key in ref:
            assert_close(f"{graph} dense block_rows={rows} {key}", out[key], ref[key], RTOL[F64], ATOL[F64])


@pytest.mark.parametrize("graph", BLOCK_GRAPHS)
def test_dense_result_does_not_depend_on_tile_size(graph, monkeypatch):
    """Key tiles of 1, 3, 7 columns (dividing no block's width) and blocks of 4 rows: the online
    softmax's moving shift gives what naive gives, also where a row's first edges come late."""
    g = BLOCK_GRAPHS[graph]()
    inputs = core_inputs(g, seed=23, bias=False)
    ref = attention_core("naive", g, *inputs)
    for tile in (1, 3, 7):
        monkeypatch.setattr(gtx, "_TILE", tile)
        for rows in (4, None):
            out = attention_core("dense", g, *inputs, block_rows=rows)
            for key in ref:
                assert_close(f"{graph} dense tile={tile} block_rows={rows} {key}", out[key], ref[key],
                             RTOL[F64], ATOL[F64])


def test_dense_blocks_cover_every_edge_once():
    for make in BLOCK_GRAPHS.values():
        g = make()
        for rows in (1, 3, 128):
            blocks = gtx.dense_blocks(g, rows)
            assert [b.rows.start for b in blocks] + [g.num_nodes] == [0] + [b.rows.stop for b in blocks]
            assert all(b.rows.stop - b.rows.start <= rows for b in blocks if g.ptr.size == 2)
            pairs = sum(int(gtx._edge_mask(g, b, np.r_[b.cols]).sum()) for b in blocks)
            assert pairs == g.num_edges, "each edge in exactly one block"
    # a batch keeps its graphs whole in blocks where they fit
    g = gtx.batch_graphs([gtx.complete_graph(n) for n in (30, 40, 50, 20)])
    assert [(b.rows.start, b.rows.stop) for b in gtx.dense_blocks(g, 100)] == [(0, 70), (70, 140)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_its_graphs_one_by_one(backend):
    parts = [gtx.complete_graph(4), gtx.causal_graph(5, window=2), shuffled_random_graph(6, 2, 23),
             gtx.complete_graph(3, self_loops=False)]
    g = gtx.batch_graphs(parts)
    x, p, dy, eb = make_inputs(g, seed=23)
    whole = run(backend, g, x, p, dy, eb)
    grads = {k: 0 for k in PARAM_KEYS}
    for n, part in enumerate(parts):
        nodes, edges = slice(g.ptr[n], g.ptr[n + 1]), slice(*np.cumsum([0] + [q.num_edges for q in parts])[n:n + 2])
        one = run(backend, part, x[nodes], p, dy[nodes], eb[edges])
        for key in ("y", "dx"):
            assert_close(f"{backend} part {n} {key}", whole[key][nodes], one[key], 1e-12, 1e-14)
        for key in ("alpha", "dedge_bias"):
            assert_close(f"{backend} part {n} {key}", whole[key][edges], one[key], 1e-12, 1e-14)
        grads = {k: grads[k] + one["d" + k] for k in PARAM_KEYS}
    for k in PARAM_KEYS:                                           # parameters are shared: their gradients add up
        assert_close(f"{backend} d{k}", whole["d" + k], grads[k], 1e-12, 1e-14)


@pytest.mark.filterwarnings("ignore:invalid value encountered")   # NaN inputs: expected
@pytest.mark.parametrize("graph", ["components", "batch", "batch_mixed", "isolated_nodes"])
def test_nonfinite_feature_reaches_in_backward_only_what_naive_reaches(graph):
    g = GRAPHS[graph]()
    for bad_node in range(g.num_nodes):
        x, p, dy, _ = make_inputs(g, seed=24, bias=False)
        x[bad_node] = np.nan if bad_node % 2 else np.inf
        outs = {b: run(b, g, x, p, dy) for b in NAN_SAFE}
        want = {k: ~np.isfinite(outs["naive"][k]).reshape(g.num_nodes, -1).any(1) for k in ("y", "dx")}
        j, i = g.edge_index
        near = np.zeros(g.num_nodes, bool)                         # at most two edges away from bad_node
        near[bad_node] = near[i[j == bad_node]] = True
        near[j[near[i]]] = True
        for b, out in outs.items():
            for k in ("y", "dx"):
                got = ~np.isfinite(out[k]).reshape(g.num_nodes, -1).any(1)
                assert np.array_equal(got, want[k]), f"{graph} {b} {k}: non-finite rows {np.flatnonzero(got)}, " \
                                                     f"naive's {np.flatnonzero(want[k])} (bad node {bad_node})"
                assert not got[~near].any(), f"{graph} {b} {k}: reached nodes far from bad node {bad_node}"
        if not ((j == bad_node) | (i == bad_node)).any():          # a node without edges reaches no output
            assert all(np.isfinite(out[k]).all() for out in outs.values() for k in ("y", "dx", "alpha"))


def assert_nonfinite_where_naive(outs, what):
    """Each backend's y, dx, alpha and every gradient non-finite exactly where naive's are."""
    for b, out in outs.items():
        for k, want in outs["naive"].items():
            got = ~np.isfinite(out[k])
            assert np.array_equal(got, ~np.isfinite(want)), \
                f"{what}: {b} {k} non-finite at {np.argwhere(got ^ ~np.isfinite(want))[:4].tolist()}..., not as naive"


@pytest.mark.filterwarnings("ignore:invalid value encountered")   # NaN inputs: expected
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "edge_bias"])
@pytest.mark.parametrize("tile", [512, 3])
@pytest.mark.parametrize("graph", ["batch", "batch_mixed", "batch_complete", "random0", "window"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_nonfinite_feature_reaches_every_output_only_as_in_naive(graph, bias, tile, dtype,
                                                                  monkeypatch):
    """An inf or NaN feature at each node in turn, on a batch of graphs and on general ones: y, dx and
    every gradient are non-finite exactly where naive's are, in every backend but textbook; dense
    also with key tiles of 3 columns; in float32 too."""
    monkeypatch.setattr(gtx, "_TILE", tile)
    g = GRAPHS[graph]()
    for bad_node in range(g.num_nodes):
        x, p, dy, eb = make_inputs(g, seed=26, bias=bias, dtype=dtype)
        x[bad_node] = np.nan if bad_node % 2 else np.inf
        outs = {b: run(b, g, x, p, dy, eb) for b in NAN_SAFE}
        assert_nonfinite_where_naive(outs, f"{graph}, bad node {bad_node}")


@pytest.mark.filterwarnings("ignore:invalid value encountered")   # NaN inputs: expected
@pytest.mark.parametrize("graph", ["components", "batch", "isolated_nodes", "random0"])
def test_nonfinite_edge_bias_reaches_only_what_naive_reaches(graph):
    """An inf or NaN edge bias at edge e: y, dx and every gradient non-finite exactly where naive's are."""
    g = GRAPHS[graph]()
    for e in range(0, g.num_edges, max(1, g.num_edges // 6)):
        x, p, dy, eb = make_inputs(g, seed=25)
        eb[e, e % eb.shape[1]] = np.nan if e % 2 else np.inf
        outs = {b: run(b, g, x, p, dy, eb) for b in NAN_SAFE}
        assert_nonfinite_where_naive(outs, f"{graph}, bias of edge {e}")


def test_property_dense_equals_naive_on_random_graphs_and_blocks():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @st.composite
    def graphs(draw):
        kind = draw(st.sampled_from(["random", "complete", "causal", "batch"]))
        n = draw(st.integers(0, 12))
        if kind == "random":
            return gtx.random_graph(n, avg_degree=draw(st.floats(0, max(n - 1, 0))), rng=draw(st.integers(0, 99)))
        if kind == "complete":
            return gtx.complete_graph(n, self_loops=draw(st.booleans()))
        if kind == "causal":
            return gtx.causal_graph(n, window=draw(st.one_of(st.none(), st.integers(1, 5))))
        return gtx.batch_graphs([gtx.complete_graph(m) for m in draw(st.lists(st.integers(1, 5), max_size=4))])

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
    @hypothesis.given(graphs(), st.integers(1, 14), st.booleans())
    def check(g, rows, bias):
        inputs = core_inputs(g, seed=25, bias=bias)
        ref, out = attention_core("naive", g, *inputs), attention_core("dense", g, *inputs, block_rows=rows)
        for key in ref:
            assert_close(f"dense {g} block_rows={rows} {key}", out[key], ref[key], RTOL[F64], ATOL[F64])
    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lifted_backend_with_separate_arrays(backend):
    """q, k, v and their gradient buffers need not come from the projection's packed array."""
    g = shuffled_random_graph(15, 3, 26)
    q, k, v, eb, do = core_inputs(g, seed=26, dtype=F32)
    out = attention_core(backend, g, q.copy(), k.copy(), v.copy(), eb, do)
    ref = attention_core("naive", g, *(a.astype(F64) for a in (q, k, v, eb, do)))
    for key in ref:
        assert out[key].dtype == F32
        assert_close(f"{backend} {key}", out[key], ref[key], RTOL[F32], ATOL[F32])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("case", ["loose", "denormal", "far", "overflow"])
def test_dense_extreme_scores(case, dtype, monkeypatch):
    """Scores far from 0 agree with naive. "loose": q scaled up; in head 0, q along e0 and k along
    e1 ("denormal", "far") put a few scores ~94 or ~10^3 apart, where float32 weights would be
    denormal (gtx's threads count them as 0) or underflow; "overflow": |q|^2 overflows float32
    and k is 0, so every score is 0."""
    g = gtx.random_graph(60, avg_degree=9, rng=4)
    q, k, v, _, do = core_inputs(g, H=2, dh=8, seed=27, bias=False)
    e0, e1 = np.eye(8)[0], np.eye(8)[1]
    if case == "loose":
        q *= 4
    elif case == "overflow":
        q[:, 0], k[:, 0] = 2e19 * e0, 0
    else:
        scale = 16.3 if case == "denormal" else 100
        q[:, 0], k[:, 0] = 0.1 * q[:, 0] + scale * e0, 0.1 * k[:, 0] + scale * e1
    ref = attention_core("naive", g, q, k, v, None, do)
    for tile in (512, 4):
        monkeypatch.setattr(gtx, "_TILE", tile)
        out = attention_core("dense", g, *(a.astype(dtype) for a in (q, k, v)), None, do.astype(dtype))
        for key in ref:
            assert_close(f"dense ({case}, {dtype.__name__}, tile {tile}) {key}", out[key], ref[key],
                         RTOL[dtype], ATOL[dtype])


@pytest.mark.parametrize("scale", [5, 8])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_sharply_peaked_attention_agrees(scale, dtype, monkeypatch):
    """q, k scaled up: scores with a std of about 25 and 64 put many exp(s - shift) below float32's
    smallest normal number, which gtx's threads flush to 0 (_swap_mxcsr). Weights and gradients
    still agree with naive, which keeps them, in every backend, on a complete and a random graph."""
    for g in (gtx.complete_graph(40), gtx.random_graph(60, avg_degree=12, rng=5)):
        q, k, v, _, do = core_inputs(g, H=2, dh=8, seed=31, bias=False)
        q, k = scale * q, scale * k
        ref = attention_core("naive", g, q, k, v, None, do)
        alpha = gtx.naive_forward(q, k, v, None, g)[1].alpha
        assert (alpha < 2.0**-126).mean() > 0.05, "the case must make tiny weights"
        for backend, kw, tile in (("dense", {}, 512), ("dense", dict(block_rows=8), 5), ("sparse", {}, 512)):
            monkeypatch.setattr(gtx, "_TILE", tile)     # 5: a tile's max often passes the shift
            out = attention_core(backend, g, *(a.astype(dtype) for a in (q, k, v)), None, do.astype(dtype), **kw)
            for key in ref:
                assert_close(f"{backend} {kw} (scale {scale}, {dtype.__name__}, N={g.num_nodes}) {key}",
                             out[key], ref[key], RTOL[dtype], ATOL[dtype])


@pytest.mark.skipif(gtx._NO_DENORMALS is None, reason="gtx flushes denormals on x86 only (MXCSR)")
def test_denormals_are_zero_in_gtx_threads_only():
    """BLAS and exp take ~100x longer on each denormal float, which sharply peaked attention makes.
    gtx's threads count them as 0 while they work; the caller's thread gets its own mode back."""
    tiny = lambda _: np.exp(np.full(16, -100, F32))                   # e^-100: a float32 denormal

    def mode():                                         # this thread's MXCSR, less its status flags
        old = gtx._mxcsr(np.uint32(0x1F80))
        gtx._mxcsr(np.uint32(old))
        return int(old) & ~0x3F
    assert (tiny(0) > 0).all(), "this thread keeps denormals before gtx runs"
    assert all((t == 0).all() for t in gtx._map_threads(tiny, range(4))), "gtx's threads flush them"
    mine = gtx._mxcsr(np.uint32(0x7F80))                # round toward zero: a mode gtx must give back
    try:
        g = gtx.complete_graph(64)
        x, p, dy, _ = make_inputs(g, bias=False, dtype=F32)
        gtx.backward(dy, gtx.forward(x, g, p, backend="dense")[1])
        assert mode() == 0x7F80, f"after a gtx call, MXCSR is {mode():#x}, not the caller's 0x7f80"
        with pytest.raises(ZeroDivisionError):
            gtx._map_threads(lambda i: 1 // i, range(3))                # item 0 runs on this thread
        assert mode() == 0x7F80, f"after a run raised, MXCSR is {mode():#x}, not the caller's 0x7f80"
    finally:
        gtx._mxcsr(np.uint32(mine))
    assert (tiny(0) > 0).all(), "the caller's thread keeps denormals after gtx runs"


# ---------------------------------------------------------------- choosing a backend, limits, side effects

def test_choose_backend_and_auto(monkeypatch):
    for g, want in ((gtx.complete_graph(512), "dense"), (gtx.random_graph(4000, avg_degree=4, rng=0), "sparse")):
        name, cost = gtx.choose_backend(g, 4, 16)
        assert name == want and set(cost) == {"dense", "sparse"} and cost[name] == min(cost.values()), (g, cost)
    g = make_graph(FD_EDGES, 5)
    x, p, dy, _ = make_inputs(g, bias=False)
    y, cache = gtx.forward(x, g, p)                                 # backend="auto" is the default
    assert cache.backend == gtx.choose_backend(g, 2, 4, F64)[0]
    assert_close("auto y", y, gtx.forward(x, g, p, backend="naive")[0], RTOL[F64])
    monkeypatch.setattr(gtx, "available_bytes", lambda: gtx.dense_bytes(g, 2, 4, F64) - 1)
    assert gtx.choose_backend(g, 2, 4, F64)[0] == "sparse", "never a backend that would raise MemoryError"
    assert gtx.forward(x, g, p)[1].backend == "sparse"


def test_clear_limits_instead_of_raw_allocation_errors(monkeypatch):
    with pytest.raises(MemoryError, match="eigendecomposition"):
        gtx.laplacian_pe(gtx.complete_graph(100_000), 4)           # ~300 GiB: refused before allocating
    monkeypatch.setattr(gtx, "available_bytes", lambda: 10**6)
    with pytest.raises(MemoryError, match="complete_graph"):
        gtx.Graph(np.zeros((2, 20_000), np.int64), 5)
    gtx.Graph(np.zeros((2, 1), np.int64), 5)                       # small enough: fine


def test_dtype_mismatch_names_the_fix():
    g = make_graph(FD_EDGES, 5)
    x, p, _, _ = make_inputs(g, bias=False)
    with pytest.raises(ValueError, match=r"init_params\(\.\.\., dtype=np\.float32\)"):
        gtx.forward(x.astype(F32), g, p)


def test_plain_backends_run_no_engine(monkeypatch):
    """naive and textbook, Part 1 of gtx.py: forward, backward, attention_weights, block_forward and
    block_backward start no gtx thread, call no Numba kernel and leave BLAS's threads alone."""
    def refuse(*args, **kwargs):
        raise AssertionError("the engine ran")
    engine = [n for n, v in vars(gtx).items() if isinstance(v, numba.core.dispatcher.Dispatcher)]
    assert len(engine) >= 4, f"gtx's Numba kernels: {engine}"
    for name in engine + ["_map_threads", "_python_threads", "_one_blas_thread", "_buffer", "_matmuls"]:
        monkeypatch.setattr(gtx, name, refuse)
    g = GRAPHS["batch_mixed"]()
    x, p, dy, eb = block_inputs(g)
    for backend in ("naive", "textbook"):
        run(backend, g, x, p, dy, eb)
        run_block(backend, g, x, p, dy, eb)
        run_block(backend, g, x, p, dy, eb, norm_first=False, activation="relu")
    with pytest.raises(AssertionError, match="the engine ran"):
        run("dense", g, x, p, dy, eb)



# Part 1 alone, in a process where Numba, llvmlite and threadpoolctl cannot be imported: each call
# writes its outputs (or its error's type) under a name; the test makes the same calls on gtx.
PART1_CALLS = """
import numpy as np
def calls(gtx):
    out = {}
    def record(name, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except Exception as e:                      # the type is what must match
            out[name + " raises"] = type(e).__name__
            return None
        if isinstance(result, dict):
            out.update({f"{name} {k}": v for k, v in result.items()})
        elif isinstance(result, tuple):
            for n, r in enumerate(result):
                if isinstance(r, np.ndarray):
                    out[f"{name} {n}"] = r
                elif isinstance(r, dict):
                    out.update({f"{name} {n} {k}": v for k, v in r.items()})
        else:
            out[name] = np.asarray(result)
        return result
    graphs = {"edges": gtx.Graph(np.array([[0, 1, 2, 1, 3], [1, 2, 0, 1, 1]]), 5),
              "complete": gtx.complete_graph(6), "complete_no_self": gtx.complete_graph(4, False),
              "causal": gtx.causal_graph(7, window=3), "random": gtx.random_graph(9, 3, rng=1)}
    graphs["batch"] = gtx.batch_graphs([graphs["edges"], graphs["causal"], gtx.complete_graph(1)])
    for name, g in graphs.items():
        out[f"graph {name} edge_index"] = g.edge_index
        out[f"graph {name} ptr"] = g.ptr
    rng = np.random.default_rng(0)
    g = graphs["batch"]
    p = record("init_params", gtx.init_params, 8, 2, 3, rng=1)
    pb = record("init_block", gtx.init_block, 8, 2, d_ff=12, rng=2)
    x = rng.standard_normal((g.num_nodes, 8))
    dy = rng.standard_normal((g.num_nodes, 8))
    eb = rng.standard_normal((g.num_edges, 2))
    for backend in ("naive", "textbook"):
        y, cache = record("forward " + backend, gtx.forward, x, g, p, backend, eb)
        record("backward " + backend, gtx.backward, dy, cache)
        record("attention_weights " + backend, gtx.attention_weights, cache)
        for norm_first in (True, False):
            kw = dict(norm_first=norm_first, backend=backend, edge_bias=eb)
            y, cache = record(f"block_forward {backend} {norm_first}", gtx.block_forward, x, g, pb, **kw)
            record(f"block_backward {backend} {norm_first}", gtx.block_backward, dy, cache)
    record("sinusoidal_pe", gtx.sinusoidal_pe, 7, 5)
    record("laplacian_pe", gtx.laplacian_pe, g, 3)
    record("random_walk_pe", gtx.random_walk_pe, g, 4)
    record("shortest_path_lengths", gtx.shortest_path_lengths, g, gtx.complete_graph(g.num_nodes))
    bad = {"Graph float": (gtx.Graph, np.zeros((2, 1)), 2), "Graph node": (gtx.Graph, [[0], [2]], 2),
           "Graph duplicate": (gtx.Graph, [[0, 0], [1, 1]], 2), "Graph shape": (gtx.Graph, [0, 1], 2),
           "complete_graph": (gtx.complete_graph, 2.0), "causal_graph": (gtx.causal_graph, 3, 0),
           "random_graph": (gtx.random_graph, 3, 9), "init_params": (gtx.init_params, 0, 2),
           "forward backend": (gtx.forward, x, g, p, "fast"), "forward x": (gtx.forward, x[1:], g, p),
           "forward dtype": (gtx.forward, x.astype(np.float32), g, p, "naive"),
           "forward bias": (gtx.forward, x, g, p, "naive", eb[1:]),
           "forward params": (gtx.forward, x, g, {"Wq": p["Wq"]}, "naive"),
           "backward dy": (gtx.backward, dy[1:], cache.attention),
           "block eps": (gtx.block_forward, x, g, pb, True, "gelu", 0.0, "naive"),
           "block activation": (gtx.block_forward, x, g, pb, True, "tanh", 1e-5, "naive"),
           "laplacian_pe": (gtx.laplacian_pe, g, -1), "random_walk_pe": (gtx.random_walk_pe, x, 2)}
    for name, (f, *args) in bad.items():
        if record("bad " + name, f, *args) is not None or "bad " + name + " raises" not in out:
            out["bad " + name + " raises"] = "nothing"
    return out
"""
PART1_CHILD = PART1_CALLS + """
import sys
for name in ("numba", "llvmlite", "threadpoolctl"):
    sys.modules[name] = None                        # import raises ImportError
sys.path.insert(0, sys.argv[1])
import gtx_part1
out = calls(gtx_part1)
out["auto backend"] = np.array(gtx_part1.forward(np.ones((3, 4)), gtx_part1.complete_graph(3),
                               gtx_part1.init_params(4, 2, rng=0))[1].backend)
np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in out.items()})
"""


def test_part1_runs_alone(tmp_path):
    """gtx.py cut at Part 2's banner imports and runs without Numba (llvmlite, threadpoolctl): the
    graphs, parameters, naive and textbook through the API, the block and the encodings give gtx's
    numbers, bit for bit, and the same error types; auto takes textbook there."""
    lines = open(os.path.join(HERE, "gtx.py")).read().splitlines(keepends=True)
    banner = next(n for n, line in enumerate(lines) if re.match(r"# =+ Part 2: the engine", line))
    (tmp_path / "gtx_part1.py").write_text("".join(lines[:banner]))
    child = subprocess.run([sys.executable, "-c", PART1_CHILD, str(tmp_path), str(tmp_path / "out.npz")],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, f"Part 1 alone failed:\n{child.stderr[-3000:]}"
    alone = dict(np.load(tmp_path / "out.npz"))
    assert str(alone.pop("auto backend")) == "textbook"
    namespace = {}
    exec(PART1_CALLS, namespace)
    full = namespace["calls"](gtx)
    assert sorted(alone) == sorted(full), f"calls differ: {set(alone) ^ set(full)}"
    for name, want in full.items():
        got = alone[name]
        if name.endswith(" raises"):
            assert str(got) == want, f"{name}: Part 1 alone raises {got}, gtx {want}"
            assert want != "nothing", f"{name}: bad input raised nothing"
        else:
            assert got.shape == np.shape(want) and np.array_equal(got, want, equal_nan=True), (
                f"{name}: Part 1 alone differs from gtx by {np.abs(got - want).max()}")
    assert sum(name.endswith(" raises") for name in full) == 18


SIGINT_CHILD = """
import os, signal, sys, threading, time
import numpy as np, gtx
backend, phase = sys.argv[1:]
g = gtx.complete_graph(16000) if backend == "dense" else gtx.causal_graph(60000, window=300)
p = gtx.init_params(32, 4, 8, rng=0, dtype=np.float32)
x = np.random.default_rng(0).standard_normal((g.num_nodes, 32)).astype(np.float32)
small = gtx.random_graph(40, avg_degree=5, rng=1)
gtx.backward(*gtx.forward(x[:40], small, p, backend=backend))        # compiled, threads started
cache = None
if phase == "backward":
    y, cache = gtx.forward(x, g, p, backend=backend)
sent = []
def fire():
    time.sleep(0.5)
    sent.append(time.perf_counter())
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=fire, daemon=True).start()
try:
    if phase == "forward":
        gtx.forward(x, g, p, backend=backend)
    else:
        gtx.backward(y, cache)
    print("no interrupt")
except KeyboardInterrupt:
    print(f"{time.perf_counter() - sent[0]:.3f}")
y1, c1 = gtx.forward(x[:40], small, p, backend=backend)              # the next call is right
y0, c0 = gtx.forward(x[:40], small, p, backend="naive")
dx1, dx0 = gtx.backward(y0, c1)[0], gtx.backward(y0, c0)[0]
print(float(max(np.abs(y1 - y0).max(), np.abs(dx1 - dx0).max())))
"""


@pytest.mark.parametrize("phase", ["forward", "backward"])
@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_ctrl_c_stops_the_call_promptly(backend, phase):
    """SIGINT half a second into a dense or sparse call of several seconds raises KeyboardInterrupt
    in the main thread within 1 s (gtx's other threads stop at their next unit of work), and the
    next call in the process gives naive's numbers."""
    r = subprocess.run([sys.executable, "-c", SIGINT_CHILD, backend, phase], cwd=HERE, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    seconds, err = r.stdout.split()
    assert seconds != "no", f"{backend} {phase}: the call ended before the signal: make it longer"
    assert float(seconds) < 1.0, f"{backend} {phase}: KeyboardInterrupt {seconds} s after the signal"
    assert float(err) < 1e-4, f"{backend} {phase}: the next call differs from naive by {err}"


MAP_THREADS_RAISE = """
import time, gtx
done = []
def fn(i):
    if i == 0:
        time.sleep(0.05)
        raise ValueError("item 0")
    time.sleep(0.2)
    done.append(i)
try:
    gtx._map_threads(fn, range(40))             # 4 threads, runs of 10: item 0 in this thread's
    print("no exception")
except ValueError as e:
    n = len(done)
    time.sleep(0.6)
    print(str(e).replace(" ", "_"), n, len(done))
"""


def test_map_threads_raises_the_first_exception_once_all_stopped():
    """On 4 threads, an exception in one stops the others at their next item: the call raises it as
    itself, and nothing runs after the call has raised."""
    r = subprocess.run([sys.executable, "-c", MAP_THREADS_RAISE], cwd=HERE, capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, NUMBA_NUM_THREADS="4"))
    assert r.returncode == 0, r.stderr[-2000:]
    message, at_raise, later = r.stdout.split()
    assert message == "item_0"
    assert int(at_raise) == int(later), f"{int(later) - int(at_raise)} items ran after the call raised"
    assert int(at_raise) <= 3, f"{at_raise} items ran: the other threads did not stop at their first"


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_memory_guard_reads_the_cgroup(tmp_path, monkeypatch, version):
    """available_bytes is at most what the process's cgroup (or a parent) leaves, limit less usage
    less reclaimable cache, read from files the test writes; "max" or v1's huge value is none."""
    gib = 2**30
    if version == "v2":
        (tmp_path / "self").write_text("0::/a/b\n")
        limit, usage, root = "memory.max", "memory.current", tmp_path
    else:
        (tmp_path / "self").write_text("5:cpu:/a\n4:memory:/a/b\n")
        limit, usage, root = "memory.limit_in_bytes", "memory.usage_in_bytes", tmp_path / "memory"
    (root / "a" / "b").mkdir(parents=True)
    no_limit = "max" if version == "v2" else "9223372036854771712"
    for folder, cap, used in ((root / "a" / "b", no_limit, 5 * gib), (root / "a", 3 * gib, gib // 2),
                              (root, no_limit, 0)):
        (folder / limit).write_text(f"{cap}\n")
        (folder / usage).write_text(f"{used}\n")
    monkeypatch.setitem(gtx._CGROUP, "root", str(tmp_path))
    monkeypatch.setitem(gtx._CGROUP, "self", str(tmp_path / "self"))
    gtx._cgroup_limits.cache_clear()
    gtx.release_buffers()
    try:
        want = min(psutil.virtual_memory().available, 3 * gib - gib // 2)    # a's limit less usage
        assert abs(gtx.available_bytes() - want) < 2**26, f"{gtx.available_bytes():,} for {want:,}"
        if psutil.virtual_memory().available > 4 * gib:
            with pytest.raises(MemoryError, match="2.5 GiB is available"):
                gtx._check_memory(4 * gib, "4 GiB")
        inactive = "inactive_file" if version == "v2" else "total_inactive_file"
        (root / "a" / "memory.stat").write_text(f"anon 1\n{inactive} {gib // 2}\n")
        want = min(psutil.virtual_memory().available, 3 * gib)       # reclaimable cache is free
        assert abs(gtx.available_bytes() - want) < 2**26, f"{gtx.available_bytes():,} for {want:,}"
        (root / "a" / limit).write_text(f"{no_limit}\n")              # no limit left
        gtx._cgroup_limits.cache_clear()
        assert abs(gtx.available_bytes() - psutil.virtual_memory().available) < 2**26
    finally:
        gtx._cgroup_limits.cache_clear()


RSS_CHECK = """
import gc, json, sys
import numpy as np, psutil, gtx
g = gtx.complete_graph(4096)
p = gtx.init_params(256, 4, 64, rng=0, dtype=np.float32)
x = np.random.default_rng(0).standard_normal((4096, 256)).astype(np.float32)
def call(graph):
    y, cache = gtx.forward(x[:graph.num_nodes], graph, p, backend="dense")
    gtx.backward(y, cache)
call(gtx.complete_graph(64))                    # warm-up: compiled, threads started
gc.collect()
before = psutil.Process().memory_info().rss
call(g)
gc.collect()
held = psutil.Process().memory_info().rss
gtx.release_buffers()
after = psutil.Process().memory_info().rss
print(json.dumps([before, held, after]))
"""


def test_release_buffers_gives_the_memory_back():
    """After a dense forward and backward on complete_graph(4096) (D/H/dh 256/4/64, float32) with
    every output dropped, release_buffers brings RSS back within 10% of before the call."""
    r = subprocess.run([sys.executable, "-c", RSS_CHECK], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    before, held, after = json.loads(r.stdout.splitlines()[-1])
    assert held > 1.1 * before, f"the call held only {held - before:,} bytes: the test shows nothing"
    assert after <= 1.1 * before, f"RSS {after:,} after release_buffers, {before:,} before the call"

MEMORY_CHECK = """
import json, sys, tracemalloc
import numpy as np, gtx
name, n, D, H, dh, dtype, bias = json.loads(sys.argv[1])
graphs = {"complete": lambda: gtx.complete_graph(n), "window": lambda: gtx.causal_graph(n, window=64),
          "molecules": lambda: gtx.batch_graphs([gtx.complete_graph(int(m)) for m in
                                                 np.random.default_rng(0).integers(15, 36, n)]),
          "random": lambda: gtx.random_graph(n, avg_degree=8, rng=0)}
g, rng = graphs[name](), np.random.default_rng(0)
x, dy = rng.standard_normal((2, g.num_nodes, D)).astype(dtype)
eb = rng.standard_normal((g.num_edges, H)).astype(dtype) if bias else None
p = gtx.init_params(D, H, dh, rng=0, dtype=dtype)
tiny = gtx.complete_graph(2)                    # first calls (Numba's cache, threads), not counted
gtx.backward(np.ones((2, D), dtype), gtx.forward(np.ones((2, D), dtype), tiny, p, backend="dense")[1])
tracemalloc.start()
y, cache = gtx.forward(x, g, p, backend="dense", edge_bias=eb)
gtx.backward(dy, cache)
print(json.dumps([tracemalloc.get_traced_memory()[1], int(gtx.dense_bytes(g, H, dh, dtype, bias, d_model=D))]))
"""


@pytest.mark.parametrize("case", [("complete", 768, 64, 4, 16, "float32", False),
                                  ("window", 3000, 32, 2, 16, "float64", False),
                                  ("molecules", 60, 32, 4, 8, "float32", True),
                                  ("random", 1500, 24, 3, 8, "float64", True)], ids=lambda c: c[0])
def test_dense_bytes_counts_what_dense_allocates(case):
    """In a fresh process, the peak of the memory NumPy allocates over one dense forward plus backward
    (tracemalloc) is at most gtx.dense_bytes, and no less than half of it."""
    r = subprocess.run([sys.executable, "-c", MEMORY_CHECK, json.dumps(case)], cwd=HERE, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    peak, predicted = json.loads(r.stdout.splitlines()[-1])
    assert peak <= predicted, f"{case[0]}: dense allocated {peak:,} bytes, dense_bytes predicted {predicted:,}"
    assert predicted <= 2 * peak, f"{case[0]}: dense_bytes predicted {predicted:,}, dense allocated {peak:,}"


def test_import_leaves_the_environment_unchanged():
    code = ("import os, numpy, numba, psutil, threadpoolctl; before = dict(os.environ); import gtx; "
            "g = gtx.random_graph(50, avg_degree=3, rng=0); x = numpy.ones((50, 8)); "
            "y, c = gtx.forward(x, g, gtx.init_params(8, 2), backend='sparse'); gtx.backward(y, c); "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", f"import gtx changed os.environ: {r.stdout}"


# ---------------------------------------------------------------- positional encodings

def test_sinusoidal_pe():
    n, d = 9, 6
    want = np.zeros((n, d))
    for pos in range(n):
        for i in range(d // 2):
            w = pos / 10000 ** (2 * i / d)
            want[pos, 2 * i], want[pos, 2 * i + 1] = np.sin(w), np.cos(w)
    assert_close("sinusoidal_pe", gtx.sinusoidal_pe(n, d), want, 1e-12)


def laplacian(g):
    """I - D^-1/2 A D^-1/2 of the undirected graph without self-loops (an isolated node keeps L_ii = 1)."""
    n = g.num_nodes
    A = np.zeros((n, n))
    j, i = g.edge_index
    A[j, i] = A[i, j] = 1
    np.fill_diagonal(A, 0)
    deg = A.sum(1)
    dinv = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1)), 0)
    return np.eye(n) - dinv[:, None] * A * dinv[None, :]


def check_laplacian_pe(g, pe, k):
    """Orthonormal eigenvectors of the k smallest non-trivial eigenvalues, ascending, zero padding past N-1."""
    L, m = laplacian(g), min(k, g.num_nodes - 1)
    assert pe.shape == (g.num_nodes, k)
    V = pe[:, :m]
    lam = np.einsum("nk,nm,mk->k", V, L, V)       # Rayleigh quotients
    assert_close("V^T V", V.T @ V, np.eye(m), 0, atol=1e-10)
    assert_close("L V - V lambda", L @ V, V * lam, 0, atol=1e-8)
    assert_close("eigenvalues", lam, np.linalg.eigvalsh(L)[1:m + 1], 0, atol=1e-8)
    assert not pe[:, m:].any(), "columns past N-1 should be zero padding"
    return lam


LPE_GRAPHS = {
    "random": (lambda: gtx.random_graph(14, avg_degree=2, rng=11), 5),
    "disconnected_isolated_self_loop": (lambda: make_graph([(0, 1), (1, 2), (2, 0), (3, 4), (4, 5), (5, 5)], 8), 6),
    "path_k_too_large": (lambda: make_graph([(0, 1), (1, 2), (3, 2)], 4), 6),
    "single_node": (lambda: make_graph([], 1), 2),
}


@pytest.mark.parametrize("graph", LPE_GRAPHS)
def test_laplacian_pe_eigenvectors(graph):
    make, k = LPE_GRAPHS[graph]
    check_laplacian_pe(make(), gtx.laplacian_pe(make(), k), k)


def test_laplacian_pe_cycle_eigenvalues():
    n, k = 10, 6
    g = make_graph([(v, (v + 1) % n) for v in range(n)], n)     # directed cycle; the PE uses the undirected one
    lam = check_laplacian_pe(g, gtx.laplacian_pe(g, k), k)
    want = np.sort(1 - np.cos(2 * np.pi * np.arange(1, n) / n))[:k]
    assert_close("cycle eigenvalues", lam, want, 0, atol=1e-10)


def test_laplacian_pe_relabelling_and_signs():
    # A path with two chords: no symmetry, simple eigenvalues, eigenvectors unique up to sign.
    n, k = 8, 5
    edges = [(v, v + 1) for v in range(n - 1)] + [(1, 4), (2, 6)]
    g = make_graph(edges, n)
    assert np.diff(np.linalg.eigvalsh(laplacian(g))).min() > 1e-3, "precondition: simple eigenvalues"
    pe = gtx.laplacian_pe(g, k)
    check_laplacian_pe(g, pe, k)
    top = np.abs(pe).argmax(0)
    assert (pe[top, np.arange(k)] > 0).all(), "sign convention: largest |entry| of each column is positive"

    perm = np.random.default_rng(12).permutation(n)               # node v becomes perm[v]
    pe_p = gtx.laplacian_pe(gtx.Graph(perm[np.array(edges).T], n), k)[perm]
    signs = np.sign(np.sum(pe_p * pe, 0))
    assert_close("relabelled PE rows", pe_p * signs, pe, 0, atol=1e-8)

    flipped = []
    for seed in range(6):
        pe_r = gtx.laplacian_pe(g, k, rng=np.random.default_rng(seed))
        s = np.sign(np.sum(pe_r * pe, 0))
        assert_close("sign-flipped PE", pe_r, pe * s, 0, atol=1e-12)
        assert np.array_equal(pe_r, gtx.laplacian_pe(g, k, rng=np.random.default_rng(seed)))
        flipped.append(s < 0)
    assert np.any(flipped), "rng should flip some signs"

    # undirected, self-loops ignored: reversing edges and adding self-loops changes nothing
    g2 = make_graph([(i, j) for j, i in edges] + [(v, v) for v in range(n)], n)
    assert_close("PE of reversed graph with self-loops", gtx.laplacian_pe(g2, k), pe, 0, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_permutation_equivariance_broken_by_positional_encoding(backend):
    n, D = 7, 8
    g = gtx.complete_graph(n)
    x, p, _, _ = make_inputs(g, D=D, H=2, dh=4, seed=13, bias=False)
    f = lambda x: gtx.forward(x, g, p, backend=backend)[0]
    perm = np.random.default_rng(13).permutation(n)
    # Without positions a Transformer is a function of a set: permuting tokens permutes outputs.
    assert_close(f"{backend} f(x[perm])", f(x[perm]), f(x)[perm], 1e-10)
    # With positional encodings added, it sees order.
    pe = gtx.sinusoidal_pe(n, D)
    err = np.abs(f(x[perm] + pe) - f(x + pe)[perm]).max()
    assert err > 1e-2 * np.abs(f(x + pe)).max(), f"PE should break equivariance, max diff only {err:.2g}"


# ---------------------------------------------------------------- it learns: what the graph buys

@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_training_learns_mean_of_in_neighbours(backend):
    """One gtx layer, Adam on gtx's own gradients: each node learns to output the mean of its
    in-neighbours' features. Needs the graph: the target of a node depends on other nodes only."""
    n, D, H, steps, lr = 48, 8, 2, 300, 1e-2
    g = gtx.random_graph(n, avg_degree=4, rng=14)
    j, i = g.edge_index
    deg = np.maximum(np.bincount(i, minlength=n), 1)[:, None]

    def target(x):
        s = np.zeros_like(x)
        np.add.at(s, i, x[j])
        return s / deg

    rng = np.random.default_rng(14)
    params = gtx.init_params(D, H, rng=14)
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    x_test = rng.standard_normal((n, D))
    test_loss = lambda: np.mean((gtx.forward(x_test, g, params, backend=backend)[0] - target(x_test)) ** 2)

    loss0, t0 = test_loss(), time.perf_counter()
    for t in range(1, steps + 1):
        x = rng.standard_normal((n, D))                  # fresh features every step: learn the rule, not the data
        y, cache = gtx.forward(x, g, params, backend=backend)
        _, grads = gtx.backward(2 * (y - target(x)) / y.size, cache)   # d mean-squared-error / dy
        for k in params:
            m[k] = 0.9 * m[k] + 0.1 * grads[k]
            v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
            params[k] = params[k] - lr * (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.999 ** t)) + 1e-8)
    loss1 = test_loss()
    print(f"\n[train {backend}] test loss {loss0:.3g} -> {loss1:.3g}: {loss0 / loss1:.0f}x lower "
          f"in {steps} Adam steps, {time.perf_counter() - t0:.2f} s")
    assert loss0 / loss1 >= 10


def test_what_the_graph_buys_on_held_out_graphs():
    """bench.py's experiment, fast and seeded: held-out MSE / var(target) on unseen graphs."""
    m = {arm: np.mean(r) for arm, r in bench.learn("test").items()}
    print(f"\n[learn] {m}")
    assert m["graph"] <= 0.1, f"the GNN, given the edges: {m['graph']:.3f}"
    assert m["complete+edge_bias"] <= 0.1, f"a learned bias on the graph's edges: {m['complete+edge_bias']:.3f}"
    assert m["complete"] >= 0.5, f"a Transformer without positions cannot know the edges: {m['complete']:.3f}"
    assert m["complete+laplacian"] < m["complete"], f"Laplacian PE should help: {m}"


def test_matches_pytorch_geometric_and_torch():
    """The weights map onto PyG's TransformerConv plus a Linear, and onto torch's
    MultiheadAttention when D = H dh. Skipped where torch is not installed (gtx does not need it)."""
    torch = pytest.importorskip("torch")
    conv_module = pytest.importorskip("torch_geometric.nn")
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    D, H, dh = 12, 3, 4
    g = gtx.random_graph(20, avg_degree=3, rng=29)
    x, p, _, _ = make_inputs(g, D=D, H=H, dh=dh, seed=29, bias=False)
    conv = conv_module.TransformerConv(D, dh, heads=H, root_weight=False).double()
    lin = torch.nn.Linear(H * dh, D).double()
    mha = torch.nn.MultiheadAttention(D, H).double()
    with torch.no_grad():
        for c, m in (("q", conv.lin_query), ("k", conv.lin_key), ("v", conv.lin_value)):
            m.weight.copy_(t(p["W" + c].reshape(D, H * dh).T))
            m.bias.copy_(t(p["b" + c].reshape(-1)))
        lin.weight.copy_(t(p["Wo"].reshape(H * dh, D).T))
        lin.bias.copy_(t(p["bo"]))
        mha.in_proj_weight.copy_(t(np.concatenate([p[w].reshape(D, D).T for w in ("Wq", "Wk", "Wv")])))
        mha.in_proj_bias.copy_(t(np.concatenate([p[b].reshape(-1) for b in ("bq", "bk", "bv")])))
        mha.out_proj.weight.copy_(t(p["Wo"].reshape(D, D).T))
        mha.out_proj.bias.copy_(t(p["bo"]))
        pyg = lin(conv(t(x), torch.tensor(g.edge_index))).numpy()
        xs = t(x[:7])[:, None]
        mha_y = mha(xs, xs, xs, need_weights=False)[0][:, 0].numpy()
    for backend in BACKENDS:
        assert_close(f"{backend} vs TransformerConv", gtx.forward(x, g, p, backend=backend)[0], pyg, 1e-12)
        y = gtx.forward(x[:7], gtx.complete_graph(7), p, backend=backend)[0]
        assert_close(f"{backend} vs MultiheadAttention", y, mha_y, 1e-12)


# ---------------------------------------------------------------- the Transformer block

BLOCK_VARIANTS = [(nf, act) for nf in (True, False) for act in ("relu", "gelu")]
BLOCK_IDS = [f"{'pre' if nf else 'post'}-norm-{act}" for nf, act in BLOCK_VARIANTS]


def block_inputs(g, D=6, H=2, dh=3, F=10, dtype=F64, seed=0, bias=True):
    """x, block params (every entry random, LayerNorm weights too), dy and edge_bias for g."""
    rng = np.random.default_rng(seed)
    p = gtx.init_block(D, H, d_ff=F, d_head=dh, rng=seed)
    p = {k: a + 0.3 * rng.standard_normal(a.shape) for k, a in p.items()}
    x, dy = rng.standard_normal((g.num_nodes, D)), rng.standard_normal((g.num_nodes, D))
    eb = rng.standard_normal((g.num_edges, H)) if bias else None
    return astype(dtype, x, p, dy, eb)


def run_block(backend, g, x, p, dy, eb=None, **kw):
    y, cache = gtx.block_forward(x, g, p, backend=backend, edge_bias=eb, **kw)
    dx, grads = gtx.block_backward(dy, cache)
    return {"y": y, "dx": dx, **{"d" + k: v for k, v in grads.items()}}


@pytest.mark.parametrize("norm_first,activation", BLOCK_VARIANTS, ids=BLOCK_IDS)
def test_block_gradients_match_central_differences(norm_first, activation):
    g = make_graph(FD_EDGES, 5)
    x, p, dy, eb = block_inputs(g)
    kw = dict(norm_first=norm_first, activation=activation)
    out = run_block("naive", g, x, p, dy, eb, **kw)
    assert set(out) == {"y", "dx", "dedge_bias", *("d" + k for k in gtx.BLOCK_KEYS)}

    def loss():  # weighted loss sum(y * dy): every output entry matters with its own weight
        return np.sum(gtx.block_forward(x, g, p, backend="naive", edge_bias=eb, **kw)[0] * dy)

    for name, a in {"x": x, **p, "edge_bias": eb}.items():
        assert_close(f"block {kw} d{name}", out["d" + name], central_differences(loss, a), FD_RTOL, FD_ATOL)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("graph", ["no_edges", "empty_N0", "isolated_nodes", "components", "batch_mixed",
                                   "window", "random0"])
def test_block_backends_agree(graph, dtype):
    g = GRAPHS[graph]()
    x, p, dy, eb = block_inputs(g, dtype=dtype, seed=40)
    for norm_first, activation in BLOCK_VARIANTS:
        kw = dict(norm_first=norm_first, activation=activation)
        ref = run_block("naive", g, *astype(F64, x, p, dy, eb), **kw)
        for backend in BACKENDS:
            out = run_block(backend, g, x, p, dy, eb, **kw)
            assert out.keys() == ref.keys()
            for k in ref:
                assert out[k].dtype == dtype, f"{backend} {k}: dtype {out[k].dtype}"
                # dbk is 0 up to round-off: its floor scales with dWk's, the same sums' size
                floor = RTOL[dtype] * np.abs(ref["dWk"]).max() if k == "dbk" else ATOL[dtype]
                assert_close(f"block {kw} {backend} {k}", out[k], ref[k], RTOL[dtype], floor)


def textbook_block(x, p, norm_first, activation, causal=False, eps=1e-5):
    """The Transformer layer as written in NumPy, attention by textbook_attention: no gtx code."""
    def ln(z, w, b):
        return (z - z.mean(1, keepdims=True)) / np.sqrt(z.var(1, keepdims=True) + eps) * w + b

    def ffn(z):
        a = z @ p["W1"] + p["b1"]
        if activation == "relu":
            return np.maximum(a, 0) @ p["W2"] + p["b2"]
        phi = np.vectorize(math.erf)(a / math.sqrt(2))                 # the exact gelu, a Phi(a)
        return (a * (1 + phi) / 2) @ p["W2"] + p["b2"]

    def attn(z):
        return textbook_attention(z, p, causal)[0]
    if norm_first:
        h = x + attn(ln(x, p["ln1_w"], p["ln1_b"]))
        return h + ffn(ln(h, p["ln2_w"], p["ln2_b"]))
    h = ln(x + attn(x), p["ln1_w"], p["ln1_b"])
    return ln(h + ffn(h), p["ln2_w"], p["ln2_b"])


@pytest.mark.parametrize("norm_first,activation", BLOCK_VARIANTS, ids=BLOCK_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_block_equals_textbook_transformer_layer(causal, norm_first, activation):
    n = 9
    g = gtx.causal_graph(n) if causal else gtx.complete_graph(n)
    x, p, _, _ = block_inputs(g, D=8, H=2, dh=4, F=16, seed=41, bias=False)
    want = textbook_block(x, p, norm_first, activation, causal)
    for backend in BACKENDS:
        y, cache = gtx.block_forward(x, g, p, norm_first, activation, backend=backend)
        assert cache.backend == backend
        assert_close(f"block {backend} {norm_first} {activation}", y, want, 1e-12)


def test_init_block():
    D, H, F = 12, 3, 20
    p = gtx.init_block(D, H, rng=0)
    assert set(p) == set(gtx.BLOCK_KEYS) and p["W1"].shape == (D, 4 * D) and p["W2"].shape == (4 * D, D)
    q = gtx.init_block(D, H, d_ff=F, rng=0, dtype=F32)
    for k, shape in dict(ln1_w=(D,), ln1_b=(D,), ln2_w=(D,), ln2_b=(D,), W1=(D, F), b1=(F,), W2=(F, D),
                         b2=(D,), Wq=(D, H, D // H), Wo=(H, D // H, D)).items():
        assert q[k].shape == shape and q[k].dtype == F32, k
    assert all((q[k] == 1).all() for k in ("ln1_w", "ln2_w")), "LayerNorm weights start at 1"
    assert not any(q[k].any() for k in ("ln1_b", "ln2_b", "b1", "b2", "bq", "bo")), "biases start at 0"
    bound = np.sqrt(6 / (D + F))
    for k in ("W1", "W2"):
        assert bound / 2 < np.abs(q[k]).max() <= bound, f"{k}: Glorot-uniform"
    assert np.array_equal(p["W1"], gtx.init_block(D, H, rng=0)["W1"]), "not deterministic"
    for bad in (dict(d_ff=0), dict(d_ff=2.5), dict(d_head=0)):
        with pytest.raises(BAD):
            gtx.init_block(D, H, **bad)


def test_block_bad_input_and_no_mutation():
    g = gtx.causal_graph(5)
    x, p, dy, eb = block_inputs(g, D=4, H=2, dh=2, F=6, seed=42)
    before = [a.copy() for a in (x, dy, eb, *p.values())]
    y, cache = gtx.block_forward(x, g, p, edge_bias=eb)
    dx, grads = gtx.block_backward(dy, cache)
    for a, b in zip((x, dy, eb, *p.values()), before):
        assert np.array_equal(a, b), "an input was changed"
    cases = {"activation": dict(activation="tanh"), "eps": dict(eps=0.0), "eps ": dict(eps="1e-5"),
             "backend": dict(backend="fast"), "edge_bias": dict(edge_bias=eb[:-1]),
             "missing": dict(params={k: v for k, v in p.items() if k != "W2"}),
             "W1": dict(params=dict(p, W1=p["W1"][:-1])), "ln2_w": dict(params=dict(p, ln2_w=p["ln2_w"][:-1])),
             "b1": dict(params=dict(p, b1=p["b1"][:-1])), "b2": dict(params=dict(p, b2=p["b2"][:-1])),
             "x has D=": dict(x=x[:, :-1]), "float32": dict(x=x.astype(F32)), "must be a Graph": dict(g=g.edge_index)}
    for what, kw in cases.items():
        args = dict(x=x, g=g, params=p) | kw
        with pytest.raises(BAD, match=what.strip().replace("missing", "W2").replace("float32", "dtype")):
            gtx.block_forward(args.pop("x"), args.pop("g"), args.pop("params"), **args)
    for norm_first, activation in BLOCK_VARIANTS:       # no variant changes its inputs
        y, c = gtx.block_forward(x, g, p, norm_first, activation, edge_bias=eb)
        gtx.block_backward(dy, c)
        for a, b in zip((x, dy, eb, *p.values()), before):
            assert np.array_equal(a, b), f"{norm_first} {activation}: an input was changed"
    with pytest.raises(BAD, match="dy"):
        gtx.block_backward(dy[:-1], cache)
    with pytest.raises(BAD, match="dy"):
        gtx.block_backward(dy.astype(F32), cache)
    with pytest.raises(TypeError, match="block_forward"):
        gtx.block_backward(dy, gtx.forward(x, g, p)[1])
    with pytest.raises(ValueError, match="missing"):
        gtx.block_from_torch({}, 2)
    with pytest.raises(ValueError, match="n_heads"):
        gtx.block_from_torch(gtx.block_to_torch(p), 3)
    with pytest.raises(ValueError, match="W2"):
        gtx.block_from_torch(dict(gtx.block_to_torch(p), **{"linear2.weight": np.zeros((4, 5))}), 2)


def test_block_torch_names_round_trip():
    p = gtx.init_block(8, 2, d_ff=12, rng=43)
    sd = gtx.block_to_torch(p)
    assert sd["self_attn.in_proj_weight"].shape == (24, 8) and sd["linear1.weight"].shape == (12, 8)
    back = gtx.block_from_torch(sd, 2)
    assert back.keys() == p.keys()
    for k in p:
        assert back[k].shape == p[k].shape and np.array_equal(back[k], p[k]), k
        assert not np.shares_memory(back[k], p[k]), f"{k} shares memory"


def torch_block_check(torch, g, mask, causal):
    """gtx's block against torch's TransformerEncoderLayer, float64: every output and gradient's
    relative error (bk's gradient is 0 up to round-off: its error is relative to Wk's gradient)."""
    D, H, F = 8, 2, 12
    x, p, dy, _ = block_inputs(g, D=D, H=H, dh=D // H, F=F, seed=44, bias=False)
    worst = {}
    for norm_first, activation in BLOCK_VARIANTS:
        layer = torch.nn.TransformerEncoderLayer(D, H, F, dropout=0.0, activation=activation,
                                                 norm_first=norm_first, batch_first=True, dtype=torch.float64)
        layer.load_state_dict({k: torch.from_numpy(v) for k, v in gtx.block_to_torch(p).items()})
        sd = {k: v.numpy() for k, v in layer.state_dict().items()}
        assert all(np.array_equal(gtx.block_to_torch(gtx.block_from_torch(sd, H))[k], sd[k]) for k in sd)
        xt = torch.tensor(x[None], requires_grad=True)
        yt = layer(xt, src_mask=mask, is_causal=causal)
        (yt * torch.from_numpy(dy[None])).sum().backward()
        want = {"y": yt.detach().numpy()[0], "dx": xt.grad.numpy()[0],
                **{"d" + k: v for k, v in gtx.block_from_torch(
                    {k: v.grad for k, v in layer.named_parameters()}, H).items()}}
        for backend in ("naive", "dense", "sparse"):
            out = run_block(backend, g, x, p, dy, norm_first=norm_first, activation=activation)
            for k in want:
                scale = np.abs(want["dWk" if k == "dbk" else k]).max()
                err = np.abs(out[k] - want[k]).max() / scale
                worst[k] = max(worst.get(k, 0), err)
                assert err <= 1e-10, f"{backend} {norm_first} {activation} {k}: relative error {err:.2g}"
    return worst


def test_block_matches_torch_transformer_encoder_layer():
    """Skipped where torch is not installed (gtx does not need it)."""
    torch = pytest.importorskip("torch")
    n = 7
    adj = np.random.default_rng(45).random((n, n)) < 0.3             # adj[i, j]: the edge j -> i
    np.fill_diagonal(adj, True)                                     # every query has a key
    dst, src = np.nonzero(adj)
    graphs = {"complete": (gtx.complete_graph(n), None, False),
              "causal": (gtx.causal_graph(n), torch.nn.Transformer.generate_square_subsequent_mask(
                  n, dtype=torch.float64), True),
              "general": (gtx.Graph(np.stack([src, dst]), n), torch.from_numpy(~adj), False)}
    for name, (g, mask, causal) in graphs.items():
        worst = torch_block_check(torch, g, mask, causal)
        print(f"{name}: worst relative errors " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def test_gpt_gradients_match_central_differences():
    """bench.py's GPT: the gradients of its mean cross-entropy, through the embedding, both blocks
    and the head, against float64 central differences, at 12 entries of each tensor."""
    c = dict(bench.GPT["test"], T=6, B=2, D=8, H=2)
    rng = np.random.default_rng(48)
    vocab, train, _ = bench.gpt_data()
    P = bench.gpt_init(len(vocab), c, rng, F64)
    P = {k: a + 0.1 * rng.standard_normal(a.shape) for k, a in P.items()}   # no zero biases
    tokens = bench.gpt_batch(train, rng, c["B"], c["T"])
    _, grads = bench.gpt_loss(P, tokens, backend="sparse")
    assert grads.keys() == P.keys()

    def loss():
        return bench.gpt_loss(P, tokens, backend="sparse", with_grads=False)[0]
    rows = np.unique(tokens[:, :-1])                                # the embedding rows the batch uses
    for name in P:
        flat = np.arange(P[name].size)
        if name == "emb":
            flat = (rows[:, None] * c["D"] + np.arange(c["D"])).ravel()
        entries = rng.choice(flat, min(12, flat.size), replace=False)
        scale = np.abs(grads[name]).max()                           # the whole tensor's, not the 12's
        assert_close(f"gpt d{name}", grads[name].flat[entries], central_differences(loss, P[name], entries),
                     0, FD_RTOL * scale + FD_ATOL)


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_gpt_trains_as_torch_does(backend):
    """bench.py's GPT and the same model in torch, TransformerEncoderLayers made by block_to_torch,
    from the same weights, on the same batches, with torch's Adam: 10 float64 steps, equal losses."""
    torch = pytest.importorskip("torch")
    c = bench.GPT["test"]
    B, T, D, H, lr = c["B"], c["T"], c["D"], c["H"], c["lr"]
    vocab, train, _ = bench.gpt_data()
    P = bench.gpt_init(len(vocab), c, np.random.default_rng(46), F64)
    emb = torch.nn.Embedding(len(vocab), D, dtype=torch.float64)
    head = torch.nn.Linear(D, len(vocab), dtype=torch.float64)
    layers = [torch.nn.TransformerEncoderLayer(D, H, 4 * D, dropout=0.0, activation="gelu", norm_first=True,
                                               batch_first=True, dtype=torch.float64)
              for _ in range(bench.GPT_LAYERS)]
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(P["emb"]))
        head.weight.copy_(torch.from_numpy(P["head_W"].T))
        head.bias.copy_(torch.from_numpy(P["head_b"]))
    for n, layer in enumerate(layers):
        layer.load_state_dict({k: torch.from_numpy(v) for k, v in gtx.block_to_torch(bench.gpt_block(P, n)).items()})
    modules = torch.nn.ModuleList([emb, head, *layers])
    opt = torch.optim.Adam(modules.parameters(), lr=lr)
    pe = torch.from_numpy(gtx.sinusoidal_pe(T, D))
    mask = torch.nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
    state, rng, ours, theirs = bench.adam_state(P), np.random.default_rng(47), [], []
    for step in range(1, c["steps"] + 1):
        tokens = bench.gpt_batch(train, rng, B, T)
        loss, grads = bench.gpt_loss(P, tokens, backend=backend)
        bench.adam(P, grads, state, step, lr)
        ours.append(loss)
        t = torch.from_numpy(tokens)
        x = emb(t[:, :-1]) + pe
        for layer in layers:
            x = layer(x, src_mask=mask, is_causal=True)
        tloss = torch.nn.functional.cross_entropy(head(x).reshape(-1, len(vocab)), t[:, 1:].reshape(-1))
        opt.zero_grad()
        tloss.backward()
        opt.step()
        theirs.append(tloss.item())
    err = np.abs(np.array(ours) - theirs).max() / np.abs(theirs).max()
    print(f"gpt {backend}: losses {ours[0]:.6f} -> {ours[-1]:.6f}, worst relative difference {err:.1e}")
    assert ours[-1] < ours[0], f"the loss should fall in 10 steps: {ours}"
    assert err <= 1e-9, f"gtx's losses {ours}\ntorch's {theirs}\nrelative difference {err:.2g}"


# ---------------------------------------------------------------- the benchmark and the README

def test_bench_quick_runs():
    r = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--quick"], cwd=HERE,
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, f"bench.py --quick failed:\n{r.stderr[-3000:]}"
    assert "transformer (N=" in r.stdout and "crossover" in r.stdout, r.stdout[-3000:]
    assert "held-out bits/char: model" in r.stdout and "a GPT on causal graphs" in r.stdout, r.stdout[-3000:]
    assert "MISMATCH" not in r.stdout, r.stdout[-3000:]
    wide = [line for line in r.stdout.splitlines() if len(line) > 100 and not line.startswith(("json", "plot"))]
    assert not wide, f"the output must fit in 100 columns: {wide}"


def test_bench_measurements_without_linux_paths(monkeypatch):
    """The memory and CPU readings fall back to portable ones where /proc and glibc are missing."""
    import ctypes.util
    monkeypatch.setattr(bench, "PROC", "/nonexistent")             # no /proc: not Linux
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)   # no glibc malloc_trim
    bench.release_freed_memory()
    assert bench.reset_peak() is False
    assert bench.peak_rss() >= 10 * 2**20, "ru_maxrss of this process"
    t0 = bench.cpu_ticks()
    sum(range(10**6))
    assert 0 <= bench.others_share(t0, bench.cpu_ticks()) <= 1
    task = dict(dtype="float32", threads=numba.get_num_threads(), spec=("random", 300, 4), D=8, H=2,
                dh=4, backend="sparse")
    m = bench.child_memory(task)
    assert m["exact"] is False and isinstance(m["peak_bytes"], int), m   # marked as an upper bound
    monkeypatch.setitem(sys.modules, "resource", None)             # no resource module either
    windows = getattr(psutil.Process().memory_info(), "peak_wset", None)
    assert bench.peak_rss() == windows, "Windows' peak working set, or None where there is none"
    if windows is None:
        assert bench.child_memory(task) == {"error": "no peak RSS here"}


def test_readme_snippets_run_from_another_folder(tmp_path):
    """After the README's set-up (pip install -r requirements.txt installs gtx), every Python
    snippet in it runs as written from a folder outside the repository."""
    with open(os.path.join(HERE, "README.md")) as f:
        snippets = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert snippets
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for n, code in enumerate(snippets):
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, f"README snippet {n} failed in {tmp_path}:\n{code}\n{r.stderr[-2000:]}"


# ---------------------------------------------------------------- parallel programs

PARALLEL_CASES = [("sparse", "random"), ("dense", "random"), ("sparse", "window"), ("dense", "complete")]


def parallel_work(case):
    """One forward, backward and attention_weights of a case; module level, so workers can run it."""
    backend, kind = case
    g = {"random": gtx.random_graph(400, avg_degree=8, rng=4), "window": gtx.causal_graph(300, 16),
         "complete": gtx.complete_graph(200)}[kind]
    x, p, dy, eb = make_inputs(g, D=16, H=2, dh=8, dtype=F32, seed=4, bias=kind == "random")
    return run(backend, g, x, p, dy, eb)


def assert_same_bits(got, want, what):
    for k in want:
        assert np.array_equal(got[k], want[k]), f"{what}: {k} differs from the serial call"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_process_pool_workers_match_the_parent(method):
    """A process that has used gtx (sparse and dense) maps gtx over a Pool of that start method and
    gets its own results back. GNU OpenMP made forked workers die, and the Pool then waited forever:
    the timeout on the result turns a hang into a failure (a guard, not a timing)."""
    import multiprocessing
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method on this platform")
    want = [parallel_work(case) for case in PARALLEL_CASES]
    with multiprocessing.get_context(method).Pool(2) as pool:
        try:
            got = pool.map_async(parallel_work, PARALLEL_CASES).get(timeout=120)
        except multiprocessing.TimeoutError:
            pytest.fail(f"a {method} Pool using gtx gave no result in 120 s: its workers hung or died")
    for case, g, w in zip(PARALLEL_CASES, got, want):
        assert_same_bits(g, w, f"{method} worker, {case}")


def test_concurrent_threads_match_serial_calls():
    """Six user threads calling gtx at once get the same bits as serial calls."""
    from concurrent.futures import ThreadPoolExecutor
    cases = PARALLEL_CASES * 3
    want = [parallel_work(case) for case in PARALLEL_CASES]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(parallel_work, cases))
    for n, (case, g) in enumerate(zip(cases, got)):
        assert_same_bits(g, want[n % len(PARALLEL_CASES)], f"thread call {n}, {case}")


def thread_case(name, backend):
    """y and every gradient of one dense or sparse call on issue 31's graphs, D/H/dh 32/4/8 float32."""
    g = {"random": gtx.random_graph(300, avg_degree=8, rng=0), "window": gtx.causal_graph(257, window=33),
         "complete": gtx.complete_graph(150)}[name]
    x, p, dy, _ = make_inputs(g, D=32, H=4, dh=8, dtype=F32, seed=31, bias=False)
    y, cache = gtx.forward(x, g, p, backend=backend)
    dx, grads = gtx.backward(dy, cache)
    return dict(y=y, dx=dx, **grads)


def test_a_call_from_any_thread_gives_the_main_threads_bits():
    """From a threading.Thread, alone or six at once, gtx holds BLAS to one thread as from the main
    one (threadpoolctl lets only its first thread change OpenBLAS's count): the same bits."""
    from concurrent.futures import ThreadPoolExecutor
    import threading
    cases = [(name, backend) for name in ("random", "window", "complete") for backend in ("dense", "sparse")]
    want = {case: thread_case(*case) for case in cases}
    for case in cases:
        got = {}
        t = threading.Thread(target=lambda: got.update(out=thread_case(*case)))
        t.start()
        t.join()
        assert_same_bits(got["out"], want[case], f"{case} from one thread")
    with ThreadPoolExecutor(6) as pool:
        for case, out in zip(cases, pool.map(lambda c: thread_case(*c), cases)):
            assert_same_bits(out, want[case], f"{case} from six threads at once")


def work_and_hold(case):
    """parallel_work in a worker, and gtx's count of calls holding BLAS to one thread after it."""
    return parallel_work(case), gtx._BLAS_HOLD["calls"]


def test_fork_while_another_thread_is_inside_gtx():
    """Workers forked while one of the parent's threads is in a gtx call match the parent's
    results, and gtx's BLAS hold starts afresh in them (the parent's call never ends there)."""
    import multiprocessing
    import threading
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork start method on this platform")
    want = [parallel_work(case) for case in PARALLEL_CASES]     # compiled before any fork
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            parallel_work(("dense", "complete"))
    thread = threading.Thread(target=busy)
    thread.start()
    try:
        while gtx._BLAS_HOLD["calls"] == 0:                     # until busy is inside gtx
            time.sleep(0.001)
        with multiprocessing.get_context("fork").Pool(2) as pool:
            try:
                got = pool.map_async(work_and_hold, PARALLEL_CASES).get(timeout=120)
            except multiprocessing.TimeoutError:
                pytest.fail("a Pool forked while a thread was inside gtx gave no result in 120 s")
    finally:
        stop.set()
        thread.join()
    for case, (g, calls), w in zip(PARALLEL_CASES, got, want):
        assert_same_bits(g, w, f"fork worker, {case}")
        assert calls == 0, f"fork worker, {case}: {calls} gtx calls still hold BLAS after its own"


# ---------------------------------------------------------------- molecules and structural encodings

def both_ways(edges):
    """Each (j, i) pair and its reverse: an undirected graph as gtx's edges."""
    return edges + [(i, j) for j, i in edges]


def assert_same_ints(name, got, want):
    """Equal integer arrays, the message naming the tensor and the first entries that differ."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, want {want.shape}"
    bad = np.argwhere(got != want)
    assert not bad.size, (f"{name}: {len(bad)} entries differ, first at {tuple(bad[0])}: "
                          f"{got[tuple(bad[0])]} instead of {want[tuple(bad[0])]}")


def test_random_walk_pe_cycle():
    """On a 6-cycle a walk returns after 2 steps with 1/2 and after 4 with 3/8, never when odd."""
    g = make_graph(both_ways([(v, (v + 1) % 6) for v in range(6)]), 6)
    want = np.tile([0, 1 / 2, 0, 3 / 8], (6, 1))
    assert_close("random_walk_pe on a 6-cycle", gtx.random_walk_pe(g, 4), want, 0, atol=1e-15)
    one_way = make_graph([(v, (v + 1) % 6) for v in range(6)], 6)        # the walk is undirected
    assert_close("random_walk_pe on a directed 6-cycle", gtx.random_walk_pe(one_way, 4), want, 0, atol=1e-15)


def test_random_walk_pe_star_isolated_and_batch():
    """A star of 4 leaves: the centre is back after 2 steps surely, a leaf with 1/4; an isolated
    node (a self-loop only) gets 0; a batch encodes each part as if alone."""
    g = make_graph(star(5), 5)
    pe = gtx.random_walk_pe(g, 3)
    assert_close("star centre", pe[0], [0, 1, 0], 0, atol=1e-15)
    assert_close("star leaves", pe[1:], np.tile([0, 1 / 4, 0], (4, 1)), 0, atol=1e-15)
    lone = make_graph([(0, 0)], 1)
    batch = gtx.batch_graphs([g, lone, make_graph(both_ways([(0, 1), (1, 2), (2, 0)]), 3)])
    want = np.concatenate([pe, np.zeros((1, 3)), gtx.random_walk_pe(make_graph(both_ways([(0, 1), (1, 2), (2, 0)]), 3), 3)])
    assert_close("random_walk_pe of a batch", gtx.random_walk_pe(batch, 3), want, 0, atol=1e-15)
    assert_close("triangle, by hand", want[6], [0, 1 / 2, 1 / 4], 0, atol=1e-15)
    assert gtx.random_walk_pe(g, 0).shape == (5, 0)


def path_graph(n):
    return make_graph(both_ways([(v, v + 1) for v in range(n - 1)]), n)


def test_shortest_path_lengths_path():
    """On a path of 5 nodes the hops from j to i are |i - j|, in pairs' edge order (i n + j)."""
    n = 5
    hops = gtx.shortest_path_lengths(path_graph(n), gtx.complete_graph(n))
    want = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]).reshape(-1)
    assert_same_ints("hops on a path", hops, want)
    pairs = make_graph([(4, 0), (2, 2), (1, 3)], n)                      # any pairs, in their order
    assert_same_ints("hops for chosen pairs", gtx.shortest_path_lengths(path_graph(n), pairs), [4, 0, 2])


def test_shortest_path_lengths_two_components():
    """A batch of a path and a triangle: -1 across the two, their own hops within each."""
    tri = make_graph(both_ways([(0, 1), (1, 2), (2, 0)]), 3)
    g = gtx.batch_graphs([path_graph(4), tri])
    hops = gtx.shortest_path_lengths(g, gtx.complete_graph(7)).reshape(7, 7)    # [i, j]
    assert_same_ints("across the components", hops[:4, 4:], np.full((4, 3), -1))
    assert_same_ints("across the components", hops[4:, :4], np.full((3, 4), -1))
    assert_same_ints("within the path", hops[:4, :4], np.abs(np.arange(4)[:, None] - np.arange(4)))
    assert_same_ints("within the triangle", hops[4:, 4:], 1 - np.eye(3, dtype=int))
    pairs = gtx.batch_graphs([gtx.complete_graph(4), gtx.complete_graph(3)])      # per molecule
    assert_same_ints("per-molecule pairs", gtx.shortest_path_lengths(g, pairs),
                     np.concatenate([hops[:4, :4].reshape(-1), hops[4:, 4:].reshape(-1)]))


def plain_bfs(g, j):
    """(N,) hops from j along g's edges j -> i, -1 where unreachable: the textbook queue."""
    out = {v: [] for v in range(g.num_nodes)}
    for a, b in g.edge_index.T.tolist():
        out[a].append(b)
    dist, queue = [-1] * g.num_nodes, [j]
    dist[j] = 0
    for u in queue:
        for w in out[u]:
            if dist[w] < 0:
                dist[w] = dist[u] + 1
                queue.append(w)
    return np.array(dist)


@pytest.mark.parametrize("seed", range(6))
def test_shortest_path_lengths_against_bfs(seed):
    """Directed random graphs, sparse enough to leave unreachable pairs, every pair and a random
    subset of pairs in random order, against one plain BFS per source."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    g = shuffled_random_graph(n, float(rng.uniform(0.3, 2.5)), seed)
    want = np.stack([plain_bfs(g, j) for j in range(n)], 1)                      # [i, j]
    got = gtx.shortest_path_lengths(g, gtx.complete_graph(n)).reshape(n, n)
    assert_same_ints(f"hops on random graph {seed} (n={n}, E={g.num_edges})", got, want)
    pairs = shuffled_random_graph(n, min(3.0, n - 1.0), seed + 100)
    j, i = pairs.edge_index
    assert_same_ints(f"hops for random pairs {seed}", gtx.shortest_path_lengths(g, pairs), want[i, j])


def test_structural_encodings_bad_input():
    g = path_graph(3)
    with pytest.raises(TypeError, match="g must be a gtx.Graph"):
        gtx.random_walk_pe(np.zeros((2, 2), int), 2)
    with pytest.raises(ValueError, match="k must be >= 0"):
        gtx.random_walk_pe(g, -1)
    with pytest.raises(TypeError, match="k must be an int"):
        gtx.random_walk_pe(g, 2.0)
    with pytest.raises(TypeError, match="pairs must be gtx.Graph"):
        gtx.shortest_path_lengths(g, np.array([[0], [1]]))
    with pytest.raises(ValueError, match="pairs must be on g's 3 nodes, has 4"):
        gtx.shortest_path_lengths(g, gtx.complete_graph(4))


def test_spd_table_gradient():
    """The hop table's gradient, gathered from block_backward's grads["edge_bias"], against
    float64 central differences of a random weighted loss sum(y * dy)."""
    rng = np.random.default_rng(3)
    bonds = gtx.batch_graphs([path_graph(4), make_graph(both_ways([(0, 1), (1, 2), (2, 0)]), 3)])
    g = gtx.complete_graph(7)                                # across the parts: the no-path bucket
    buckets = bench.spd_buckets(gtx.shortest_path_lengths(bonds, g))
    D, H = 8, 2
    params = gtx.init_block(D, H, rng=rng)
    table = rng.normal(size=(H, bench.MOL_HOPS + 2))
    x, dy = rng.normal(size=(7, D)), rng.normal(size=(7, D))

    def loss():
        return float((gtx.block_forward(x, g, params, edge_bias=bench.spd_bias(table, buckets))[0] * dy).sum())
    _, cache = gtx.block_forward(x, g, params, edge_bias=bench.spd_bias(table, buckets))
    grads = gtx.block_backward(dy, cache)[1]
    got = bench.spd_bias_grad(grads["edge_bias"], buckets, table.shape[1])
    assert_close("d loss / d hop table", got, central_differences(loss, table), FD_RTOL, FD_ATOL)
    assert np.abs(got[:, bench.MOL_HOPS + 1]).max() > 0, "the no-path bucket should get a gradient"


def molecule(smiles):
    pytest.importorskip("rdkit")
    return bench.parse_smiles(smiles, 0)


def feature_counts(x):
    """{(kind, value): atoms} of mol_graph's one-hot columns, zero counts left out."""
    names = ([("element", e) for e in bench.ELEMENTS + ("other",)] + [("aromatic", True)]
             + [("charge", c) for c in bench.CHARGES + ("other",)]
             + [("H", h) for h in tuple(range(bench.MAX_HS)) + ("more",)]
             + [("degree", d) for d in tuple(range(bench.MAX_DEGREE)) + ("more",)] + [("ring", True)])
    assert x.shape[1] == len(names) == bench.N_FEATURES
    assert set(np.unique(x)) <= {0.0, 1.0}, "features are one-hot"
    return {name: int(c) for name, c in zip(names, x.sum(0)) if c}


@pytest.mark.parametrize("smiles, atoms, edges, counts", [
    ("c1ccccc1", 6, 12, {("element", "C"): 6, ("aromatic", True): 6, ("charge", 0): 6, ("H", 1): 6,
                         ("degree", 2): 6, ("ring", True): 6}),
    ("CCO", 3, 4, {("element", "C"): 2, ("element", "O"): 1, ("charge", 0): 3, ("H", 3): 1, ("H", 2): 1,
                   ("H", 1): 1, ("degree", 1): 2, ("degree", 2): 1}),
    ("CC(=O)[O-].[NH4+]", 5, 6, {("element", "C"): 2, ("element", "O"): 2, ("element", "N"): 1,
                                 ("charge", 0): 3, ("charge", -1): 1, ("charge", 1): 1, ("H", 3): 1,
                                 ("H", 0): 3, ("H", "more"): 1, ("degree", 1): 3, ("degree", 3): 1,
                                 ("degree", 0): 1}),
    ("CC1CC1[Sn]", 5, 10, {("element", "C"): 4, ("element", "other"): 1, ("charge", 0): 5, ("H", 3): 1,
                           ("H", 2): 1, ("H", 1): 2, ("H", 0): 1, ("degree", 1): 2, ("degree", 2): 1,
                           ("degree", 3): 2, ("ring", True): 3}),
], ids=["benzene", "ethanol", "acetate_ammonium", "methylcyclopropyl_tin"])
def test_featuriser_counted_by_hand(smiles, atoms, edges, counts):
    x, bonds = bench.mol_graph(molecule(smiles))
    assert x.shape == (atoms, bench.N_FEATURES), f"{smiles}: x has shape {x.shape}"
    assert bonds.num_edges == edges, f"{smiles}: {bonds.num_edges} directed edges, want {edges}"
    j, i = bonds.edge_index
    assert set(zip(j.tolist(), i.tolist())) == set(zip(i.tolist(), j.tolist())), "every bond both ways"
    assert feature_counts(x) == counts, f"{smiles}: feature counts {feature_counts(x)}"


def test_penalized_logp_by_hand():
    """logP - SA - max(0, largest ring - 6), each term standardised by JT-VAE's constants, typed
    here: cyclooctane's ring costs 2, toluene's none."""
    from rdkit.Chem import Crippen
    for smiles, ring_penalty in (("C1CCCCCCC1", 2), ("Cc1ccccc1", 0)):
        mol = molecule(smiles)
        want = ((Crippen.MolLogP(mol) - 2.4570953396190123) / 1.434324401111988
                + (-bench.sa_scorer().calculateScore(mol) + 3.0525811293166134) / 0.8335207024513095
                + (-ring_penalty + 0.0485696876403053) / 0.2860212110245455)
        assert bench.ring_penalty(mol) == ring_penalty, f"{smiles}: ring penalty {bench.ring_penalty(mol)}"
        got = bench.penalized_logp(mol)
        assert abs(got - want) < 1e-12, f"penalized logP of {smiles}: {got}, want {want}"


def zinc_rows():
    import csv
    with open(bench.ZINC_CSV, newline="") as f:
        return list(csv.DictReader(f))


def test_zinc_csv_split_and_licence():
    """data/zinc.csv: 12,000 distinct molecules, 10,000 / 1,000 / 1,000 in that order, beside
    MOSES's MIT licence notice."""
    rows = zinc_rows()
    assert [r["split"] for r in rows] == ["train"] * 10_000 + ["val"] * 1_000 + ["test"] * 1_000
    assert len({r["smiles"] for r in rows}) == 12_000, "a molecule appears twice"
    with open(os.path.join(os.path.dirname(bench.ZINC_CSV), "zinc.LICENSE")) as f:
        notice = f.read()
    assert "Copyright 2018 Insilico Medicine" in notice and "Permission is hereby granted" in notice


def test_zinc_csv_target_recomputed():
    """RDKit recomputes the CSV's target, and its canonical SMILES, on 60 rows drawn at random
    (the CSV stores repr of the float, so the same RDKit gives the same bits)."""
    pytest.importorskip("rdkit")
    from rdkit import Chem
    rows = zinc_rows()
    for i in np.random.default_rng(1).choice(len(rows), 60, replace=False):
        mol = molecule(rows[i]["smiles"])
        assert Chem.MolToSmiles(mol) == rows[i]["smiles"], f"row {i + 2}: not RDKit's canonical SMILES"
        got, want = bench.penalized_logp(mol), float(rows[i]["penalized_logp"])
        assert abs(got - want) < 1e-9, f"row {i + 2} {rows[i]['smiles']}: recomputed {got}, the CSV {want}"


def test_zinc_bad_split(tmp_path, monkeypatch):
    """A split other than train, val or test in zinc.csv is an error naming its row."""
    pytest.importorskip("rdkit")
    bad = tmp_path / "zinc.csv"
    bad.write_text("smiles,split,penalized_logp\nCCO,train,0.5\nCCN,valid,0.1\n")
    monkeypatch.setattr(bench, "ZINC_CSV", str(bad))
    with pytest.raises(ValueError, match="row 3: split must be train, val or test, got 'valid'"):
        bench.zinc_data()


def test_mol_lr_and_stalled():
    """The warm-up rises linearly to lr, the cosine falls to 0 at the cap, constant holds lr; a run
    has stalled once its last patience evaluations fail to beat the best before them."""
    c = dict(lr=2e-3, warmup=10, schedule="cosine")
    got = [bench.mol_lr(c, s, 110) for s in (1, 10, 60, 110)]
    assert np.allclose(got, [2e-4, 2e-3, 1e-3, 0], rtol=0, atol=1e-15), got
    assert bench.mol_lr(dict(c, schedule="constant"), 110, 110) == 2e-3
    curve = [(5, 1.0), (10, 0.8), (15, 0.9), (20, 0.85)]
    assert not bench.stalled(curve[:2], 1), "a new best is no stall"
    assert bench.stalled(curve[:3], 1) and not bench.stalled(curve[:3], 2)
    assert bench.stalled(curve, 2), "0.9 and 0.85 both fail to beat 0.8"
    assert bench.stalled(curve[:2] + [(15, 0.8)], 1), "a tie is no improvement"


def test_mol_train_scores_the_best_step():
    """mol_train's test metric is the best validation step's, not the last step's: a run stopped by
    its patience after its best step scores as a run that ended there (constant lr, same seed)."""
    pytest.importorskip("rdkit")
    recs = bench.mol_records(bench.zinc_data(first=48)["train"])
    data = dict(train=recs[:32], val=recs[32:40], test=recs[40:])
    c = dict(bench.MOL["quick"], lr=1e-2, schedule="constant", patience=2)
    long = bench.mol_train("bonds", data, c, 60, 3, 0, np.float64, "mae")
    assert long["best_step"] < long["curve"][-1][0], f"pick a run that goes on past its best: {long['curve']}"
    assert long["val"] == min(v for _, v in long["curve"])
    short = bench.mol_train("bonds", data, dict(c, patience=100), long["best_step"], 3, 0, np.float64, "mae")
    assert short["best_step"] == long["best_step"] and short["curve"] == long["curve"][:len(short["curve"])]
    assert abs(short["test"] - long["test"]) < 1e-12 and abs(short["train"] - long["train"]) < 1e-12, (short, long)


def test_molecule_bad_input(tmp_path, monkeypatch):
    """A SMILES RDKit cannot parse is an error naming its row (never skipped), as is a bad split."""
    pytest.importorskip("rdkit")
    with pytest.raises(ValueError, match=r"row 7: RDKit cannot parse the SMILES 'C1CC'"):
        bench.parse_smiles("C1CC", 7)
    with pytest.raises(TypeError, match="row 2: SMILES must be a str"):
        bench.parse_smiles(None, 2)
    bad = tmp_path / "solubility.csv"
    bad.write_text("smiles,sol,split\nCCO,0.5,train\nC(C,1.0,test\n")
    monkeypatch.setattr(bench, "SOLUBILITY_CSV", str(bad))
    with pytest.raises(ValueError, match=r"row 3: RDKit cannot parse the SMILES 'C\(C'"):
        bench.solubility_data()
    bad.write_text("smiles,sol,split\nCCO,0.5,valid\n")
    with pytest.raises(ValueError, match="row 2: split must be train or test, got 'valid'"):
        bench.solubility_data()


def test_solubility_csv_split():
    """data/solubility.csv holds Huuskonen's split as given: 1,025 training and 257 test molecules."""
    import csv
    with open(bench.SOLUBILITY_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "test")}
    assert counts == {"train": 1025, "test": 257}, counts


def test_mol_loss_gradients():
    """bench's molecule model, every block and the shared hop table, on a tiny float64 batch: its
    gradients against central differences of its MSE (random targets, so not a plain sum)."""
    recs = bench.mol_records([(molecule(s), y) for s, y in (("CCO", 0.3), ("c1ccccc1O", -1.2), ("CC(=O)[O-]", 2.0))])
    c = dict(bench.MOL["quick"], D=8, H=2)
    for arm in ("bonds+rwse", "complete+spd"):
        b = bench.mol_batch(arm, recs, 0.5, 1.5)
        P = bench.mol_init(arm, b["z"].shape[1], c, np.random.default_rng(0), np.float64)
        if arm == "complete+spd":
            P["spd"] = np.random.default_rng(1).normal(size=P["spd"].shape)

        def loss():
            return bench.mol_loss(P, b, with_grads=False)[1]
        grads = bench.mol_loss(P, b)[2]
        assert set(grads) == set(P), f"{arm}: gradients {sorted(set(grads) ^ set(P))} missing or extra"
        for name in ("emb_W", "head_W", "head_b", "block0.Wq", "block1.W1", "spd"):
            if name in P:                        # 24 entries of each: the test stays fast
                at = np.random.default_rng(2).choice(P[name].size, min(24, P[name].size), replace=False)
                assert_close(f"{arm}: d loss / d {name} at flat entries {at.tolist()}", grads[name].flat[at],
                             central_differences(loss, P[name], at), FD_RTOL, FD_ATOL)


def test_bench_molecules_quick(tmp_path):
    """bench.py --quick --only molecules prints both tables, says the run is short, writes the
    issue's JSON shape and the learning-curve plot; each arm's test is at its best validation step."""
    pytest.importorskip("rdkit")
    out, png = tmp_path / "mol.json", tmp_path / "mol.png"
    r = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--quick", "--only", "molecules",
                        "--seeds", "2", "--json", str(out), "--mol-plot", str(png)],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"bench.py --quick --only molecules failed:\n{r.stderr[-3000:]}"
    for text in ("solubility (log10 mol/L), test RMSE", "ZINC's penalized logP", "a short run",
                 "python bench.py --only molecules --full"):
        assert text in r.stdout, f"{text!r} not in the output:\n{r.stdout[-3000:]}"
    wide = [line for line in r.stdout.splitlines() if len(line) > 100 and not line.startswith(("json", "molecules plot"))]
    assert not wide, f"the output must fit in 100 columns: {wide}"
    try:
        import matplotlib  # noqa: F401
        assert png.stat().st_size > 10_000, "the learning-curve plot is missing or empty"
    except ImportError:
        assert "matplotlib is not installed, so no plot was written" in r.stdout, r.stdout[-3000:]
    m = json.loads(out.read_text())["molecules"]
    assert set(m) == {"solubility", "zinc"}, set(m)
    assert set(m["solubility"]["baselines"]) == {"mean", "bag_of_atoms", "esol_published", "esol_refit"}
    assert set(m["zinc"]["baselines"]) == {"mean", "bag_of_atoms"}
    stopped_early = 0
    for target, metric in (("solubility", "rmse"), ("zinc", "mae")):
        t, cap = m[target], bench.MOL["quick"]["steps"][target]
        assert t["metric"] == metric and min(t["n_train"], t["n_val"], t["n_test"]) > 0, t
        assert tuple(t["arms"]) == tuple(t["curves"]) == bench.MOL_ARMS, (tuple(t["arms"]), tuple(t["curves"]))
        for arm, a in t["arms"].items():
            assert all(len(a[k]) == 2 for k in ("test", "train", "val", "best_step")) and a["seconds"] > 0, a
            assert all(np.isfinite(a["test"] + a["train"] + a["val"])), (target, arm, a)
            steps, vals = zip(*t["curves"][arm])             # the first seed's
            assert list(steps) == sorted(steps) and steps[-1] <= cap, (target, arm, steps)
            assert a["val"][0] == min(vals) and a["best_step"][0] == steps[vals.index(min(vals))], (arm, a)
            stopped_early += steps[-1] < cap
    assert stopped_early, "with --quick's patience of 1 some run should stop before its cap"
