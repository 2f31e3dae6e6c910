"""gtx: a Transformer is a graph neural network on a complete graph.

One multi-head scaled-dot-product graph attention layer, forward and hand-written backward, and
the Transformer block around it (attention, then LayerNorm and a feed-forward network, each node
on its own). The file is in two parts:
- Part 1, the reference, is what to read: graphs, parameters, naive (per-edge loops, the spec) and
  textbook (softmax(Q K^T / sqrt(dh) + bias) V over all N^2 pairs, the graph a -inf mask), which
  agree to round-off, the API, the block and encodings: NumPy, SciPy's erf and psutil, no Numba.
- Part 2, the engine, computes the same math fast: dense (textbook by blocks of rows) and sparse
  (Numba kernels over the edges), its choose_backend, the torch maps and the plumbing.

Edge e carries a message from source j = edge_index[0, e] to target i = edge_index[1, e]:
    q, k, v = x Wq + bq, x Wk + bk, x Wv + bv                         (N, H, dh) each
    s[e, h] = <q[i_e, h], k[j_e, h]> / sqrt(dh)  (+ edge_bias[e, h])    (E, H)
    alpha[e, h] = softmax of s[., h] over the edges that share the target i_e
    o[i, h] = sum over edges e into i of alpha[e, h] v[j_e, h]        (N, H, dh), 0 without in-edges
    y = o Wo + bo                                                     (N, D)
On complete_graph(n) this is exactly softmax(Q K^T / sqrt(dh)) V per head. README.md shows use.
"""
# Dimension letters: N nodes, E edges, H heads, dh head size, D model width, F the FFN's width.
import functools
import math
from collections import namedtuple

import numpy as np
import psutil
from scipy.special import erf

PARAM_KEYS = ("Wq", "Wk", "Wv", "bq", "bk", "bv", "Wo", "bo")
BLOCK_KEYS = PARAM_KEYS + ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "W1", "b1", "W2", "b2")
FLOATS = (np.float32, np.float64)


# ---------------------------------------------------------------- graph
# Two checks every part shares: counts, and memory before anything of N^2 or E is allocated.

def _count(name, n, low=0):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < low:
        raise ValueError(f"{name} must be >= {low}, got {n}")
    return int(n)


def available_bytes():               # what the OS can hand out now; Part 2 adds cgroups' limits
    return psutil.virtual_memory().available


def _check_memory(need, what, hint=""):
    """A MemoryError that says how much what needs, rather than numpy's raw one part way through."""
    have = available_bytes()
    if need > have:
        raise MemoryError(f"{what} needs about {need / 2**30:.1f} GiB, but {have / 2**30:.1f} "
                          f"GiB is available{hint}")


class Graph:
    """A directed graph on num_nodes nodes: edge e carries a message from j = edge_index[0, e] to
    i = edge_index[1, e], edge_index (2, E) read-only and in the order given (edge_bias's order).
    ptr (B+1,) is where each graph of a batch starts, [0, N] for one; Graph(...) checks its edges.
    complete_graph, causal_graph and batch_graphs build structured graphs in O(N): node i attends
    to every j in [lo[i], hi[i]), ranges = (lo, hi), except j = i without self_loops (causal_graph
    (3): lo 0 0 0, hi 1 2 3), their edge_index listed on first use, by target, sources ascending."""

    def __init__(self, edge_index, num_nodes):
        N = _count("num_nodes", num_nodes)
        ei = np.asarray(edge_index)
        if ei.ndim != 2 or ei.shape[0] != 2:
            raise ValueError(f"edge_index must have shape (2, E), got {ei.shape}")
        if ei.size and (ei.dtype == bool or not np.issubdtype(ei.dtype, np.integer)):
            raise ValueError(f"edge_index must hold integers, got dtype {ei.dtype}")
        # about 60 bytes an edge: the int64 copy of the list, its sort keys, their order, compares
        _check_memory(60 * ei.shape[1], f"Graph: sorting {ei.shape[1]:,} edges",
                      "; complete_graph, causal_graph(n, window), batch_graphs list no edges")
        bad = np.flatnonzero(((ei < 0) | (ei >= N)).any(0))
        if bad.size:
            raise ValueError(f"edge_index column {bad[0]} is {tuple(ei[:, bad[0]].tolist())}: "
                             f"node indices must be in [0, num_nodes={N})")
        src, dst = ei.astype(np.int64)
        key = dst * N + src                         # (E,) one integer per (j, i) pair
        order = np.argsort(key, kind="stable")      # (E,) equal pairs side by side, first first
        same = key[order[1:]] == key[order[:-1]]    # (E-1,) a pair equal to the one before it
        if same.any():
            c = order[1:][same].min()
            raise ValueError(f"duplicate edge (j, i) = ({src[c]}, {dst[c]}) at edge_index[:, {c}]")
        self._setup(N, src.size, np.array([0, N]))
        self.edge_index = _read_only(np.stack([src, dst]))  # hides the cached_property below

    def _setup(self, N, E, ptr, ranges=None, self_loops=True):     # every constructor's fields
        self.num_nodes = N
        self.num_edges = int(E)
        self.ptr = ptr
        self.ranges = ranges
        self.self_loops = self_loops
        return self

    @classmethod
    def _structured(cls, lo, hi, self_loops, ptr):
        """The graph of ranges lo, hi (N,), valid by construction: no edge list to check."""
        E = _range_counts(lo, hi, self_loops).sum()
        return cls.__new__(cls)._setup(lo.size, E, ptr, (lo, hi), self_loops)

    @functools.cached_property
    def edge_index(self):           # (2, E) of a structured graph, listed on first use: 16 E bytes
        lo, hi = self.ranges        # kept, 40 E at the peak: dst, the arange, the repeat, the stack
        _check_memory(40 * self.num_edges, f"edge_index of {self.num_edges:,} structured edges")
        width = hi - lo                                                 # (N,)
        dst = np.repeat(np.arange(self.num_nodes), width)               # (sum of widths,)
        # row i's sources run lo[i], lo[i] + 1, ...: one arange, less each row's offset (ranges
        # [0, 1), [0, 2): arange 0 1 2, less 0 1 1, gives sources 0, 0 1)
        src = np.arange(width.sum()) - np.repeat(np.cumsum(width) - width - lo, width)
        if not self.self_loops:
            keep = src != dst
            src, dst = src[keep], dst[keep]
        return _read_only(np.stack([src, dst]))


def _range_counts(lo, hi, self_loops):  # (N,) each node's in-edges in a structured graph
    if self_loops:
        return hi - lo
    i = np.arange(lo.size)
    return hi - lo - ((lo <= i) & (i < hi))                             # less i -> i


def _read_only(a):
    a.flags.writeable = False
    return a


def complete_graph(n, self_loops=True):
    """All n^2 edges j -> i (n^2 - n without self-loops): a Transformer encoder's graph. O(n)."""
    n = _count("n", n)
    return Graph._structured(np.zeros(n, np.int64), np.full(n, n), self_loops, np.array([0, n]))


def causal_graph(n, window=None):
    """Edges j -> i for j <= i: a decoder's (GPT's) graph. With window=w, only j in
    [max(0, i-w+1), i], as in sliding-window (local) attention. O(n)."""
    i = np.arange(_count("n", n), dtype=np.int64)
    lo = np.zeros_like(i) if window is None else np.maximum(i - _count("window", window, 1) + 1, 0)
    return Graph._structured(lo, i + 1, True, np.array([0, n]))


def batch_graphs(graphs):
    """One block-diagonal Graph from a list, as PyG batches: node ids offset, edges concatenated in
    order, ptr (B+1,) the parts' node offsets. Structured parts alike in self-loops stay so."""
    graphs = list(graphs)
    if not all(isinstance(g, Graph) for g in graphs):
        raise TypeError("batch_graphs takes a list of Graph")
    ptr = np.cumsum([0] + [g.num_nodes for g in graphs], dtype=np.int64)     # (B+1,) node offsets
    E = sum(g.num_edges for g in graphs)
    if all(g.ranges is not None for g in graphs) and len({g.self_loops for g in graphs}) < 2:
        lo = _join([part.ranges[0] + o for part, o in zip(graphs, ptr)])      # (N,) each
        hi = _join([part.ranges[1] + o for part, o in zip(graphs, ptr)])
        return Graph._structured(lo, hi, all(g.self_loops for g in graphs), ptr)
    # each part is checked already, and offsets keep them apart: no edge list to check again
    src = _join([part.edge_index[0] + o for part, o in zip(graphs, ptr)])    # (E,) each
    dst = _join([part.edge_index[1] + o for part, o in zip(graphs, ptr)])
    g = Graph.__new__(Graph)._setup(int(ptr[-1]), E, ptr)
    g.edge_index = _read_only(np.stack([src, dst]))
    return g


def _join(parts):                       # int64 concatenation, also of no parts
    return np.concatenate([np.zeros(0, np.int64), *parts])


def random_graph(n, avg_degree=None, density=None, rng=None):
    """Uniform random directed graph, no self-loops or duplicates, edges in random order.
    Give avg_degree (E = round(avg_degree n)) or density (E = round(density n^2)), not both."""
    n = _count("n", n)
    if (avg_degree is None) == (density is None):
        raise ValueError("random_graph: give exactly one of avg_degree or density")
    E = round(avg_degree * n) if density is None else round(density * n * n)
    if not 0 <= E <= n * (n - 1):
        raise ValueError(f"random_graph: {E} edges; avg_degree or density must give 0 to n(n-1) = "
                         f"{n * (n - 1)}")
    # pair (j, i), j != i, as one of n (n - 1) keys: i = key // (n - 1), and j the remainder r, or
    # r + 1 from the diagonal on (n = 3, i = 1: r = 0, 1 give j = 0, 2), so no self-loops
    key = np.random.default_rng(rng).choice(n * (n - 1), size=E, replace=False)
    dst, src = np.divmod(key, max(n - 1, 1))
    return Graph(np.stack([src + (src >= dst), dst]), n)


# ---------------------------------------------------------------- parameters

def init_params(d_model, n_heads, d_head=None, rng=None, dtype=np.float64):
    """Wq, Wk, Wv (D, H, dh); bq, bk, bv (H, dh); Wo (H, dh, D); bo (D,). Zero biases, and weights
    uniform in Glorot's bound: of the stacked (D, 3 H dh) for Wq, Wk, Wv, of (H dh, D) for Wo."""
    def is_count(n):
        return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1
    if not (is_count(d_model) and is_count(n_heads) and (d_head is None or is_count(d_head))):
        raise ValueError(f"init_params: d_model, n_heads and d_head must be ints >= 1, got "
                         f"{d_model!r}, {n_heads!r}, {d_head!r}")
    dh = d_model // n_heads if d_head is None else d_head
    if dh < 1:
        raise ValueError(f"init_params: d_model // n_heads = {d_model // n_heads}; give d_head")
    if np.dtype(dtype) not in FLOATS:
        raise ValueError(f"init_params: dtype must be float32 or float64, got {np.dtype(dtype)}")
    D, H = d_model, n_heads
    rng = np.random.default_rng(rng)

    def W(bound, *shape):
        return rng.uniform(-bound, bound, shape).astype(dtype)
    qkv = math.sqrt(6 / (D + 3 * H * dh))          # Glorot: sqrt(6 / (fan_in + fan_out))
    out = math.sqrt(6 / (H * dh + D))
    return dict(Wq=W(qkv, D, H, dh), Wk=W(qkv, D, H, dh), Wv=W(qkv, D, H, dh), Wo=W(out, H, dh, D),
                bq=np.zeros((H, dh), dtype), bk=np.zeros((H, dh), dtype),
                bv=np.zeros((H, dh), dtype), bo=np.zeros(D, dtype))


def init_block(d_model, n_heads, d_ff=None, d_head=None, rng=None, dtype=np.float64):
    """init_params' attention; LayerNorms ln1_w, ln1_b, ln2_w, ln2_b (D,) at 1 and 0; the FFN's
    W1 (D, F) and W2 (F, D) Glorot-uniform, b1 (F,) and b2 (D,) zero; F = d_ff or 4 D."""
    rng = np.random.default_rng(rng)
    p = init_params(d_model, n_heads, d_head, rng, dtype)
    D = d_model
    F = 4 * D
    if d_ff is not None:
        F = _count("d_ff", d_ff, 1)
    bound = math.sqrt(6 / (D + F))                  # Glorot, the same for (D, F) and (F, D)
    for ln in ("ln1", "ln2"):
        p[ln + "_w"], p[ln + "_b"] = np.ones(D, dtype), np.zeros(D, dtype)
    p["W1"], p["b1"] = rng.uniform(-bound, bound, (D, F)).astype(dtype), np.zeros(F, dtype)
    p["W2"], p["b2"] = rng.uniform(-bound, bound, (F, D)).astype(dtype), np.zeros(D, dtype)
    return p


# ---------------------------------------------------------------- naive
# Each backend computes the attention between the projections q, k, v = x W + b that the API's
# forward makes: forward(q, k, v, bias, g) -> (o, cache); backward(do, cache, dq, dk, dv) -> ds,
# where do = dL/do, writes dL/dq, dL/dk, dL/dv into the (N, H, dh) dq, dk, dv and returns ds =
# dL/ds (E, H), the bias's gradient, or None without a bias. bias is None or (E, H); both in input
# edge order.
NaiveCache = namedtuple("NaiveCache", "q k v alpha g has_bias")


def naive_forward(q, k, v, bias, g):
    """Per-edge loops that read like the math; vectorised over heads and dh, never over edges."""
    src, dst = g.edge_index                                             # (E,) each
    N, H, dh = q.shape
    # pass 1: scores
    s = np.empty((g.num_edges, H), q.dtype)                             # (E, H)
    for e, (j, i) in enumerate(zip(src, dst)):
        s[e] = (q[i] * k[j]).sum(-1) / math.sqrt(dh) + (0 if bias is None else bias[e])
    # pass 2: each target's max score, subtracted for numerical stability
    m = np.full((N, H), -np.inf, q.dtype)                               # (N, H)
    for e, i in enumerate(dst):
        m[i] = np.maximum(m[i], s[e])
    m[m == -np.inf] = 0             # no in-edge, or every score -inf (a masking bias): weights 0
    # pass 3: exponentials, summed per target
    ex, den = np.empty_like(s), np.zeros((N, H), q.dtype)               # (E, H), (N, H)
    for e, i in enumerate(dst):
        ex[e] = np.exp(s[e] - m[i])
        den[i] += ex[e]
    # pass 4: weights, then the weighted sum of the sources' values
    alpha, o = np.empty_like(s), np.zeros_like(q)                       # (E, H), (N, H, dh)
    for e, (j, i) in enumerate(zip(src, dst)):
        alpha[e] = ex[e] / np.maximum(den[i], 1)   # den >= 1 unless all scores are -inf: 0 / 1
        o[i] += alpha[e][:, None] * v[j]
    return o, NaiveCache(q, k, v, alpha, g, bias is not None)


def naive_backward(do, cache, dq, dk, dv):
    """The forward's passes in reverse, each under the forward line it differentiates."""
    q, k, v, alpha, g, has_bias = cache
    src, dst = g.edge_index                                             # (E,) each
    N, H, dh = q.shape
    dq[:], dk[:], dv[:] = 0, 0, 0                   # the loops below add into them
    # backward of pass 4's sum: o[i] += alpha[e] * v[j]
    dalpha = np.empty_like(alpha)                                       # (E, H)
    for e, (j, i) in enumerate(zip(src, dst)):
        dalpha[e] = (do[i] * v[j]).sum(-1)
        dv[j] += alpha[e][:, None] * do[i]
    # backward of the softmax, passes 2-4's alpha. For edges e, f into one target, d alpha[e] /
    # d s[f] = alpha[e] ([e = f] - alpha[f]), so ds[f] = sum_e dalpha[e] alpha[e] ([e = f] -
    # alpha[f]) = alpha[f] (dalpha[f] - delta[i]), delta[i] = sum_e alpha[e] dalpha[e]. Pass 2's
    # m needs no step of its own: softmax does not change when every score of a target shifts
    delta = np.zeros((N, H), q.dtype)               # (N, H) sum over i's in-edges of alpha dalpha
    for e, i in enumerate(dst):
        delta[i] += alpha[e] * dalpha[e]
    ds = np.empty_like(alpha)                                           # (E, H)
    for e, i in enumerate(dst):
        ds[e] = alpha[e] * (dalpha[e] - delta[i])
    # backward of pass 1: s[e] = <q[i], k[j]> / sqrt(dh) + bias[e]
    for e, (j, i) in enumerate(zip(src, dst)):
        dq[i] += ds[e][:, None] * k[j] / math.sqrt(dh)
        dk[j] += ds[e][:, None] * q[i] / math.sqrt(dh)
    if has_bias:
        return ds                                                       # dL/dbias = ds
    return None


# ---------------------------------------------------------------- textbook
# The Transformer's attention as a textbook writes it, per head, over all N^2 pairs (i, j), in
# FlashAttention's notation, every array O(H N^2): for reading and small graphs. The graph is an
# additive mask: B[h, i, j] is the edge's bias (0 without one) where j -> i is an edge and -inf
# where it is not, so exp gives those pairs weight 0. A row without edges (or whose every score is
# -inf) has m = 0 and l = 0, taken as 1: its P and O are exactly 0. The cache keeps O and each
# row's log-sum-exp lse = m + log l; the backward recomputes P = exp(S - lse), as FlashAttention's.
TextbookCache = namedtuple("TextbookCache", "Q K V B O lse alpha g has_bias")


def textbook_bytes(N, n_heads, dtype):
    """Bytes textbook needs at once: about five (H, N, N) arrays (B, S, P and two temporaries)."""
    return 5 * n_heads * N * N * np.dtype(dtype).itemsize


def textbook_forward(q, k, v, bias, g):
    N, H, dh = q.shape
    _check_memory(textbook_bytes(N, H, q.dtype), f"textbook backend (N={N}, H={H})",
                  "; Part 2's backend='dense' (by blocks of rows) or 'sparse' needs less")
    Q, K, V = q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)   # (H, N, dh)
    src, dst = g.edge_index                                             # (E,) each
    B = np.full((H, N, N), -np.inf, q.dtype)                            # (H, N, N)
    B[:, dst, src] = 0 if bias is None else bias.T                     # bias.T (H, E)
    # pass 1: scores S = Q K^T / sqrt(dh) + B
    S = Q @ K.transpose(0, 2, 1) / math.sqrt(dh) + B                    # (H, N, N)
    # pass 2: each row's max m, subtracted for numerical stability
    m = S.max(-1, keepdims=True, initial=-np.inf)                       # (H, N, 1); initial: N = 0
    m[m == -np.inf] = 0
    # pass 3: exponentials, summed per row in l
    P = np.exp(S - m)                                                   # (H, N, N) unnormalised
    l = P.sum(-1, keepdims=True)                                        # (H, N, 1)
    l[l == 0] = 1                   # l >= 1 in a row with a finite score: exp(0) is among its terms
    # pass 4: P = softmax(S), O = P V
    P /= l
    O = P @ V                                                           # (H, N, dh)
    lse = m + np.log(l)                                                 # (H, N, 1) P = exp(S - lse)
    alpha = P[:, dst, src].T                                            # (E, H) input edge order
    return O.transpose(1, 0, 2), TextbookCache(Q, K, V, B, O, lse, alpha, g, bias is not None)


def textbook_backward(do, cache, dq, dk, dv):
    Q, K, V, B, O, lse, alpha, g, has_bias = cache
    N, H, dh = do.shape
    _check_memory(textbook_bytes(N, H, do.dtype), f"textbook backward (N={N}, H={H})")
    dO = do.transpose(1, 0, 2)                                          # (H, N, dh)
    # passes 1-4 again, from lse: P = exp(Q K^T / sqrt(dh) + B - lse)
    P = np.exp(Q @ K.transpose(0, 2, 1) / math.sqrt(dh) + B - lse)      # (H, N, N)
    # backward of pass 4's O = P V: dV = P^T dO, dP = dO V^T
    dv[:] = (P.transpose(0, 2, 1) @ dO).transpose(1, 0, 2)
    dP = dO @ V.transpose(0, 2, 1)                                      # (H, N, N)
    # backward of the softmax, passes 2-4's P: dS = P * (dP - delta), delta_i = sum_j P_ij dP_ij
    # (naive's derivation, row by row; * elementwise), and sum_j P_ij dP_ij = sum_j P_ij <dO_i, V_j>
    # = <dO_i, sum_j P_ij V_j> = <dO_i, O_i>. Taken from O, as FlashAttention-2 does: the recomputed
    # P, from a rounded lse, sums to 1 only to round-off, and in a saturated row, where dP - delta
    # is a difference of nearly equal numbers, that error would be larger than dS itself
    delta = (dO * O).sum(-1, keepdims=True)                             # (H, N, 1)
    dS = P * (dP - delta)                                               # (H, N, N) 0 at non-edges
    # backward of pass 1, S = Q K^T / sqrt(dh) + B: dQ = dS K / sqrt(dh), dK = dS^T Q / sqrt(dh)
    dq[:] = (dS @ K / math.sqrt(dh)).transpose(1, 0, 2)
    dk[:] = (dS.transpose(0, 2, 1) @ Q / math.sqrt(dh)).transpose(1, 0, 2)
    src, dst = g.edge_index
    if has_bias:
        return dS[:, dst, src].T                                        # (E, H) dB at the edges
    return None


# ---------------------------------------------------------------- API
# forward and backward put a backend inside the layer, between q, k, v = x W + b and y = o Wo + bo,
# and check their inputs, once, for every backend, Part 2's too.
Backend = namedtuple("Backend", "forward backward")
BACKENDS = {"naive": Backend(naive_forward, naive_backward),
            "textbook": Backend(textbook_forward, textbook_backward)}
# Part 1 never uses LAYERS: Part 2 adds dense and sparse to BACKENDS, and to LAYERS the layer it
# runs them in (these steps, on its threads); forward, backward and attention_weights hand it over.
LAYERS = {}
Cache = namedtuple("Cache", "backend x params o attention edge_bias")


def choose_backend(g, n_heads, d_head, dtype=np.float32, edge_bias=False):
    """auto's pick of Part 1's backends, textbook, with no estimates: ("textbook", {}). Part 2
    defines choose_backend again, over its dense and sparse, and auto then takes that one."""
    return "textbook", {}


def _check_inputs(x, g, params, backend, edge_bias, keys):
    """x, params (the given keys) and edge_bias, checked against g and each other."""
    if not isinstance(g, Graph):
        raise TypeError(f"g must be a Graph, got {type(g).__name__}")
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"unknown backend {backend!r}; valid ones: {', '.join(BACKENDS)}, auto")
    x = _as_float_array("x", x)
    if x.ndim != 2 or x.shape[0] != g.num_nodes:
        raise ValueError(f"x must have shape (num_nodes={g.num_nodes}, D), got {x.shape}")
    p = _check_params(params, x.shape[1], x.dtype, keys)
    if edge_bias is not None:
        shape = (g.num_edges, p["Wq"].shape[1])                        # (E, H)
        edge_bias = _as_float_array("edge_bias", edge_bias, x.dtype, shape)
    return x, p, edge_bias


def _as_float_array(name, a, dtype=None, shape=None):
    a = np.asarray(a)
    if a.dtype not in FLOATS:
        raise ValueError(f"{name} must be float32 or float64, got dtype {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        fix = (f"init_params(..., dtype=np.{dtype})" if name.startswith("params")
               else f"{name}.astype(np.{dtype})")
        raise ValueError(f"{name} has dtype {a.dtype} but x has {dtype}: all arrays must share "
                         f"one float dtype; use {fix}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    return a


def _check_params(params, D, dtype, keys):
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    missing = [key for key in keys if key not in params]
    if missing:
        raise ValueError(f"params is missing {missing}")
    Wq = np.asarray(params["Wq"])
    if Wq.ndim != 3 or Wq.shape[0] != D:
        raise ValueError(f"x has D={D} features but params['Wq'] has shape {Wq.shape}: "
                         f"Wq must be (D, H, dh)")
    _, H, dh = Wq.shape
    F = np.size(params["W1"]) // max(D, 1) if "W1" in keys else 0   # a block's FFN width
    shapes = dict(Wq=(D, H, dh), Wk=(D, H, dh), Wv=(D, H, dh), bq=(H, dh), bk=(H, dh),
                  bv=(H, dh), Wo=(H, dh, D), bo=(D,), ln1_w=(D,), ln1_b=(D,), ln2_w=(D,),
                  ln2_b=(D,), W1=(D, F), b1=(F,), W2=(F, D), b2=(D,))
    return {key: _as_float_array(f"params['{key}']", params[key], dtype, shapes[key])
            for key in keys}


def forward(x, g, params, backend="auto", edge_bias=None):
    """y (N, D) and a cache for backward. edge_bias (E, H), in g's input edge order, is added to
    the scores. backend="auto" takes choose_backend's pick: the engine's dense or sparse, or, with
    Part 1 alone, textbook; cache.backend records it. "naive", "textbook": Part 1's code only."""
    x, p, edge_bias = _check_inputs(x, g, params, backend, edge_bias, PARAM_KEYS)
    N, D = x.shape
    _, H, dh = p["Wq"].shape
    if backend == "auto":
        backend = choose_backend(g, H, dh, x.dtype, edge_bias is not None)[0]
    if backend in LAYERS:
        return LAYERS[backend].forward(x, g, p, backend, edge_bias)
    q = (x @ p["Wq"].reshape(D, H * dh)).reshape(N, H, dh) + p["bq"]   # (N, H, dh)
    k = (x @ p["Wk"].reshape(D, H * dh)).reshape(N, H, dh) + p["bk"]   # (N, H, dh)
    v = (x @ p["Wv"].reshape(D, H * dh)).reshape(N, H, dh) + p["bv"]   # (N, H, dh)
    o, attention = BACKENDS[backend].forward(q, k, v, edge_bias, g)     # (N, H, dh)
    y = o.reshape(N, H * dh) @ p["Wo"].reshape(H * dh, D) + p["bo"]     # (N, D)
    return y, Cache(backend, x, p, o, attention, edge_bias)


def backward(dy, cache):
    """dx (N, D) and grads, a dict with the keys of params (and "edge_bias" if forward had one).
    The cache holds x and params by reference: change them in place only after backward."""
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be forward's second value, got {type(cache).__name__}")
    backend, x, p, o, attention, edge_bias = cache
    dy = _as_float_array("dy", dy, x.dtype, x.shape)
    if backend in LAYERS:
        return LAYERS[backend].backward(dy, cache)
    N, D = x.shape
    _, H, dh = p["Wq"].shape
    # backward of y = o Wo + bo
    grads = {"Wo": (o.reshape(N, H * dh).T @ dy).reshape(H, dh, D), "bo": dy.sum(0)}
    do = (dy @ p["Wo"].reshape(H * dh, D).T).reshape(N, H, dh)          # (N, H, dh)
    # backward of the attention between the projections
    dq, dk, dv = np.empty_like(do), np.empty_like(do), np.empty_like(do)    # (N, H, dh) each
    ds = BACKENDS[backend].backward(do, attention, dq, dk, dv)
    if edge_bias is not None:
        grads["edge_bias"] = ds                                         # s = ... + edge_bias
    # backward of q, k, v = x W + b
    dx = np.zeros_like(x)                                               # (N, D)
    for c, d in zip("qkv", (dq, dk, dv)):
        grads["W" + c] = (x.T @ d.reshape(N, H * dh)).reshape(D, H, dh)
        grads["b" + c] = d.sum(0)
        dx += d.reshape(N, H * dh) @ p["W" + c].reshape(D, H * dh).T
    return dx, grads


def attention_weights(cache):
    """alpha (E, H) in the graph's input edge order, a new array: naive, textbook and sparse keep
    it; for dense, which keeps no per-edge array, the sparse kernels recompute it."""
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be forward's second value, got {type(cache).__name__}")
    if cache.backend in LAYERS:
        return LAYERS[cache.backend].attention_weights(cache)
    return cache.attention.alpha.copy()


# ---------------------------------------------------------------- block
# A Transformer layer is a GNN layer: attention aggregates each node's in-neighbours, then a
# residual, LayerNorm and a position-wise FFN update every node on its own. No dropout. Each part
# is forward(...) -> (out, cache) and backward(dout, cache) -> (d_input, grads), as the layer is.
BlockCache = namedtuple("BlockCache", "backend attention ln1 ln2 ffn norm_first")


def layernorm_forward(z, p, name, eps):
    """LN(z) = (z - mean(z)) / sqrt(var(z) + eps) w + b over each node's D features, with the
    params w = p[name + "_w"] and b = p[name + "_b"] (D,)."""
    rstd = 1 / np.sqrt(z.var(1, keepdims=True) + eps)                   # (N, 1)
    zhat = (z - z.mean(1, keepdims=True)) * rstd                        # (N, D)
    return zhat * p[name + "_w"] + p[name + "_b"], (zhat, rstd, p[name + "_w"], name)


def layernorm_backward(dout, cache):
    zhat, rstd, w, name = cache
    # backward of out = zhat w + b: dw = sum over nodes of dout zhat, db = sum of dout
    grads = {name + "_w": (dout * zhat).sum(0), name + "_b": dout.sum(0)}   # (D,) each
    dzhat = dout * w                                                    # (N, D)
    # backward of zhat = (z - mean(z)) rstd, rstd = (var(z) + eps)^-1/2. var = mean((z - mean)^2)
    # has d var / dz_k = 2 (z_k - mean) / D (the mean's own term sums to 0), so d rstd / dz_k =
    # -rstd^3 (z_k - mean) / D = -rstd^2 zhat_k / D. z reaches zhat directly (rstd dzhat), through
    # the mean (-rstd mean(dzhat)) and through rstd (-rstd zhat mean(dzhat zhat)); summed, the
    # closed form of llm.c's layernorm
    dz = rstd * (dzhat - dzhat.mean(1, keepdims=True)
                 - zhat * (dzhat * zhat).mean(1, keepdims=True))        # (N, D)
    return dz, grads


def ffn_forward(z, p, activation):
    """FFN(z) = act(z W1 + b1) W2 + b2, act relu or gelu(a) = a Phi(a), Phi the normal CDF."""
    a = z @ p["W1"] + p["b1"]                                           # (N, F)
    if activation == "relu":
        f = np.maximum(a, 0)                                            # (N, F)
    else:
        f = a * (1 + erf(a / math.sqrt(2))) / 2                        # (N, F) a Phi(a)
    return f @ p["W2"] + p["b2"], (z, a, f, activation, p["W1"], p["W2"])


def ffn_backward(dout, cache):
    z, a, f, activation, W1, W2 = cache
    # backward of out = f W2 + b2
    grads = {"W2": f.T @ dout, "b2": dout.sum(0)}
    df = dout @ W2.T                                                    # (N, F)
    # backward of f = act(a): relu' = [a > 0]; gelu' = Phi(a) + a phi(a), phi the normal density
    if activation == "relu":
        da = df * (a > 0)
    else:
        phi = np.exp(-a * a / 2) / math.sqrt(2 * math.pi)             # (N, F)
        da = df * ((1 + erf(a / math.sqrt(2))) / 2 + a * phi)
    # backward of a = z W1 + b1
    grads["W1"] = z.T @ da
    grads["b1"] = da.sum(0)
    return da @ W1.T, grads


def block_forward(x, g, params, norm_first=True, activation="gelu", eps=1e-5, backend="auto",
                  edge_bias=None):
    """y (N, D) and a cache for block_backward; Attn is gtx.forward, given backend and edge_bias:
    norm_first=True:  h = x + Attn(LN1(x)),  y = h + FFN(LN2(h))      (GPT-2's pre-norm)
    norm_first=False: h = LN1(x + Attn(x)),  y = LN2(h + FFN(h))      (the original post-norm)
    LN(z) = (z - mean(z)) / sqrt(var(z) + eps) w + b over each node's D features, biased var
    FFN(z) = act(z W1 + b1) W2 + b2, act relu or gelu(a) = a Phi(a), Phi the normal CDF (exact)"""
    x, p, edge_bias = _check_inputs(x, g, params, backend, edge_bias, BLOCK_KEYS)
    if activation not in ("relu", "gelu"):
        raise ValueError(f"unknown activation {activation!r}; valid ones: relu, gelu")
    if not isinstance(eps, (int, float, np.floating)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if norm_first:
        z1, ln1 = layernorm_forward(x, p, "ln1", eps)                   # (N, D)
        attn, attention = forward(z1, g, p, backend, edge_bias)         # (N, D) Attn(LN1(x))
        h = x + attn                                                    # (N, D)
        z2, ln2 = layernorm_forward(h, p, "ln2", eps)
        update, ffn = ffn_forward(z2, p, activation)                    # (N, D) FFN(LN2(h))
        y = h + update                                                  # (N, D)
    else:
        attn, attention = forward(x, g, p, backend, edge_bias)          # (N, D) Attn(x)
        r1 = x + attn                                                   # (N, D) LN1's input
        h, ln1 = layernorm_forward(r1, p, "ln1", eps)                   # (N, D)
        update, ffn = ffn_forward(h, p, activation)                     # (N, D) FFN(h)
        r2 = h + update                                                 # (N, D) LN2's input
        y, ln2 = layernorm_forward(r2, p, "ln2", eps)                   # (N, D)
    return y, BlockCache(attention.backend, attention, ln1, ln2, ffn, norm_first)


def block_backward(dy, cache):
    """dx (N, D) and grads, a dict with the keys of params (and "edge_bias" if forward had one)."""
    if not isinstance(cache, BlockCache):
        raise TypeError(f"cache must be block_forward's second value, got {type(cache).__name__}")
    _, attention, ln1, ln2, ffn, norm_first = cache
    dy = _as_float_array("dy", dy, attention.x.dtype, attention.x.shape)
    if norm_first:
        # backward of y = h + FFN(LN2(h)); grad_h is dL/dh (N, D), not dh, the head size
        dz2, ffn_grads = ffn_backward(dy, ffn)
        grad_h, ln2_grads = layernorm_backward(dz2, ln2)
        grad_h += dy
        # backward of h = x + Attn(LN1(x))
        dz1, attention_grads = backward(grad_h, attention)
        dx, ln1_grads = layernorm_backward(dz1, ln1)
        dx += grad_h
    else:
        # backward of y = LN2(r2), r2 = h + FFN(h); dr2 is dL/dr2 (N, D)
        dr2, ln2_grads = layernorm_backward(dy, ln2)
        d_update, ffn_grads = ffn_backward(dr2, ffn)
        grad_h = dr2 + d_update
        # backward of h = LN1(r1), r1 = x + Attn(x)
        dr1, ln1_grads = layernorm_backward(grad_h, ln1)
        dx, attention_grads = backward(dr1, attention)
        dx += dr1
    return dx, {**attention_grads, **ln1_grads, **ffn_grads, **ln2_grads}


# ---------------------------------------------------------------- encodings

def sinusoidal_pe(n, d):
    """(n, d) float64 encodings of Vaswani et al. (2017): PE[p, 2i] = sin(p / 10000^(2i/d)), 2i+1:
    cos. Cast them to x's dtype to add them to float32 features."""
    n = _count("n", n)
    d = _count("d", d)
    angle = np.arange(n)[:, None] / 10000 ** (np.arange(0, d, 2) / d)  # (n, ceil(d/2))
    pe = np.empty((n, d))
    pe[:, 0::2], pe[:, 1::2] = np.sin(angle), np.cos(angle[:, : d // 2])
    return pe


def laplacian_pe(g, k, rng=None):
    """(N, k) Laplacian eigenvector encodings (Dwivedi & Bresson 2020): eigenvectors of L = I -
    D^-1/2 A D^-1/2 on the undirected g, self-loops ignored, ascending, the first dropped; an
    isolated node (D^-1/2 = 0) has its indicator, eigenvalue 1. Sign: each column's entry of largest
    magnitude (the first on ties) positive, then flipped at random with an rng. Columns past N - 1
    are 0. O(N^3) time, 4 N^2 floats. On a batch the parts' eigenvalues mix: call it per graph."""
    if not isinstance(g, Graph):
        raise TypeError(f"g must be a Graph, got {type(g).__name__}")
    k = _count("k", k)
    N = g.num_nodes
    _check_memory(4 * 8 * N * N, f"laplacian_pe: the dense eigendecomposition of an {N} x {N} L")
    src, dst = g.edge_index
    A = np.zeros((N, N))                                                # (N, N) symmetric
    A[dst, src] = A[src, dst] = 1
    np.fill_diagonal(A, 0)
    deg = A.sum(1)
    d = np.divide(1, np.sqrt(deg), out=np.zeros(N), where=deg > 0)     # (N,) D^-1/2, 0 if isolated
    _, U = np.linalg.eigh(np.eye(N) - d[:, None] * A * d[None, :])     # ascending eigenvalues
    U = U[:, 1:k + 1]                                                   # (N, min(k, N-1))
    if U.size:
        big = np.abs(U) >= np.abs(U).max(0) - 1e-12   # (N, k) ties: equal but for round-off
        U = U * np.sign(U[big.argmax(0), np.arange(U.shape[1])])       # the first of them
    if rng is not None:
        U = U * np.random.default_rng(rng).choice([-1.0, 1.0], U.shape[1])
    return np.pad(U, ((0, 0), (0, k - U.shape[1])))


def _indptr(node_of_edge, N):           # (N+1,) CSR offsets: node n's edges, once sorted by node
    return np.concatenate([[0], np.cumsum(np.bincount(node_of_edge, minlength=N))])


def _components(g):
    """(N,) each node's weakly connected component, numbered 0, 1, ... by its smallest node:
    labels spread along edges both ways, each round followed by one pointer jump."""
    src, dst = g.edge_index
    label = np.arange(g.num_nodes)
    while True:
        new = label.copy()
        np.minimum.at(new, dst, label[src])
        np.minimum.at(new, src, label[dst])
        new = new[new]                          # a label is a node of its component: jump through
        if np.array_equal(new, label):
            return np.unique(label, return_inverse=True)[1]
        label = new


def _local_index(comp):
    """(N,) each node's rank inside its component and (C,) the components' sizes."""
    size = np.bincount(comp)
    order = np.argsort(comp, kind="stable")
    local = np.empty_like(comp)
    local[order] = np.arange(comp.size) - np.repeat(np.cumsum(size) - size, size)
    return local, size


def random_walk_pe(g, k):
    """(N, k) random-walk structural encodings (Dwivedi et al. 2022, GraphGPS's RWSE, PyG's
    AddRandomWalkPE): column t - 1 is the chance that a t-step random walk from node i is back at
    i, the diagonal of P^t with P = D^-1 A on the undirected g, self-loops ignored. A node with no
    other edge gets 0. Exact, by dense powers per connected component: 24 n^2 bytes each."""
    if not isinstance(g, Graph):
        raise TypeError(f"g must be a gtx.Graph, got {type(g).__name__}")
    k = _count("k", k)
    comp = _components(g)
    local, size = _local_index(comp)
    _check_memory(24 * int((size.astype(np.float64) ** 2).sum()),
                  f"random_walk_pe: the walk matrices of {size.size:,} components "
                  f"(largest {size.max(initial=0):,})",
                  "; it is exact by dense matrix powers per connected component")
    src, dst = g.edge_index
    keep = src != dst
    src, dst = src[keep], dst[keep]
    pe = np.zeros((g.num_nodes, k))
    for n in np.unique(size[size > 1]):         # components of one size as one stack of matrices
        comps = np.flatnonzero(size == n)                               # (C,)
        row = np.full(size.size, -1)
        row[comps] = np.arange(comps.size)                              # component -> its stack row
        A = np.zeros((comps.size, n, n))                                # (C, n, n)
        on = row[comp[dst]] >= 0
        A[row[comp[dst[on]]], local[dst[on]], local[src[on]]] = 1
        A[row[comp[dst[on]]], local[src[on]], local[dst[on]]] = 1       # the walk is undirected
        P = A / A.sum(2, keepdims=True)         # every node of a component of n > 1 has an edge
        nodes = np.flatnonzero(row[comp] >= 0)                          # (C n,) their nodes
        M = P
        for t in range(k):
            pe[nodes, t] = M[row[comp[nodes]], local[nodes], local[nodes]]
            M = M @ P
    return pe


def shortest_path_lengths(g, pairs):
    """(E_pairs,) hops along g's edges from j to i for each edge j -> i of pairs, a Graph on the
    same nodes, in pairs' input edge order (that of edge_bias): Graphormer's spatial encoding. The
    hops are message-passing steps on g, so a graph with every edge both ways (bonds) gives the
    undirected count; 0 from a node to itself, -1 where no path exists. One breadth-first search
    per source of pairs, all at once: each source keeps a row the size of its component, so a batch
    of molecules stays within O(E_pairs) memory, never N x N; sources run in chunks of that size."""
    if not isinstance(g, Graph) or not isinstance(pairs, Graph):
        raise TypeError(f"g and pairs must be gtx.Graph, got {type(g).__name__} and "
                        f"{type(pairs).__name__}")
    if pairs.num_nodes != g.num_nodes:
        raise ValueError(f"pairs must be on g's {g.num_nodes} nodes, has {pairs.num_nodes}")
    comp = _components(g)
    local, size = _local_index(comp)
    src, dst = g.edge_index
    order = np.argsort(src, kind="stable")
    out_dst = dst[order]                                                # (E,) targets by source
    out_ptr = _indptr(src, g.num_nodes)                                 # (N+1,)
    pj, pi = pairs.edge_index                                           # (E_pairs,) each
    hops = np.full(pairs.num_edges, -1, np.int64)
    same = comp[pj] == comp[pi]                                         # across components: -1
    sources = np.unique(pj[same])                                       # (S,) sorted
    width = size[comp[sources]]                                         # (S,) a source's row
    cap = max(pairs.num_edges, g.num_edges, 2**16)
    # 64 bytes a slot: its distance and a step's frontier arrays (at, step, w, slot, new, unique)
    _check_memory(64 * (cap + int(width.max(initial=0))) + 24 * g.num_edges,
                  f"shortest_path_lengths: searches of {cap:,} (source, node) slots at a time")
    chunk = np.cumsum(width) // cap                                     # (S,) chunk of each source
    for c in np.unique(chunk):
        s = sources[chunk == c]                                         # (S_c,) the chunk's sources
        base = np.cumsum(width[chunk == c]) - width[chunk == c]         # (S_c,) row offsets
        dist = np.full(int(width[chunk == c].sum()), -1, np.int64)      # (sum of rows,)
        dist[base + local[s]] = 0
        row, node, d = np.arange(s.size), s, 0                          # the frontier's (row, node)
        while node.size:
            d += 1
            count = out_ptr[node + 1] - out_ptr[node]
            at = np.repeat(np.arange(node.size), count)                 # each step's frontier entry
            step = np.arange(at.size) - np.repeat(np.cumsum(count) - count, count)
            w = out_dst[out_ptr[node][at] + step]
            slot = base[row[at]] + local[w]
            new = dist[slot] < 0
            slot, first = np.unique(slot[new], return_index=True)
            dist[slot] = d
            row, node = row[at][new][first], w[new][first]
        want = same & np.isin(pj, s)
        hops[want] = dist[base[np.searchsorted(s, pj[want])] + local[pi[want]]]
    return hops


# ========================================================================= Part 2: the engine
# The same math, fast: the CSR the engine reads, dense by blocks, the sparse Numba kernels, its
# choose_backend, the torch maps and the plumbing (threads, BLAS hold, buffers, MXCSR, prefetch).
# Inputs are checked by Part 1's API, and memory by Part 1's guard, _check_memory.
import contextlib
import ctypes
import os
import platform
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numba as nb
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic
from threadpoolctl import ThreadpoolController


# ---------------------------------------------------------------- the engine's graph
# What the engine reads of a graph, derived on first use and kept on it (in g._engine): the CSR
# by target, where the in-edges of each node lie together, sources ascending; then the sparse
# index, dense's blocks and the threads' node ranges below. Part 1's Graph holds the math's.
CSR = namedtuple("CSR", "indptr src perm")


def _derived(g, key, build):            # build(), once per graph and key
    store = g.__dict__.setdefault("_engine", {})
    if key not in store:
        store[key] = build()
    return store[key]


def _csr(g):
    """CSR(indptr (N+1,), src (E,), perm (E,)): the in-edges of i at indptr[i]:indptr[i+1], their
    sources src and their input ids perm. A structured graph lists its edges so: perm None."""
    def build():
        src, dst = g.edge_index
        if g.ranges is not None:
            return CSR(_csr_indptr(g), src, None)
        order = np.argsort(dst * g.num_nodes + src, kind="stable")    # (E,) by (target, source)
        return CSR(_indptr(dst, g.num_nodes), src[order], order)
    return _derived(g, "csr", build)


def _csr_indptr(g):
    """_csr(g).indptr; a structured graph's from its ranges, in O(N), with no edge list."""
    if g.ranges is None:
        return _csr(g).indptr

    def build():
        return np.concatenate([[0], np.cumsum(_range_counts(*g.ranges, g.self_loops))])
    return _derived(g, "indptr", build)


def _to_csr(a, g):                      # (E, ...) from input edge order to CSR order
    if a is None or g.ranges is not None:
        return a
    return a[_csr(g).perm]


def _input_order(a, g):                 # (E, ...) from CSR order to input edge order, a new array
    if g.ranges is not None:            # structured: the same order
        return a.copy()
    out = np.empty_like(a)
    out[_csr(g).perm] = a
    return out


# ---------------------------------------------------------------- dense
# dense_forward is textbook_forward, otherwise identical, except (time without each / with):
# - blocks of target rows, each against only the source columns its rows need (dense_blocks), a
#   block's mask built once per graph: nothing N^2 is made or kept, P is recomputed block by block;
# - a block's columns in key tiles of _TILE to 2 _TILE, an online softmax (FlashAttention-2's): the
#   rows' shift c rides in pass 1's matmul and moves only when a tile's max passes it by _LAZY,
#   so a tile is matmul, max, exp, matmul, and its (H, R, _TILE) scores stay in the cache, where
#   a block's (H, R, C) did not: long 1.19x, causal 1.11x, transformer 1.04x (AMD EPYC); long
#   1.19x, causal 1.09x (Intel Xeon);
# - columns ride in the matmuls, so that the passes over a block add and sum less (_heads_first):
#   v's ones give pass 3's l in pass 4's P V; in the backward, q's last column holds -lse and do's
#   -delta, so the matmuls give s - lse and dP - delta: long 1.12x, powerlaw 1.10x (EPYC);
# - one plan per graph and shape (_plan) splits the work over the threads in units of a group of
#   heads and blocks, largest first to the least loaded thread; a backward unit holds every block
#   whose columns it writes, so it alone adds into those dk and dv rows: no thread keeps a copy of
#   them, and the bits are the same for any thread count. 2 threads against 1, 8 calls each,
#   alternated in one process, Xeon: causal 1.91x, long 1.82x, transformer 1.68x, window 1.59x;
# - scratch arrays are per-thread buffers, kept from call to call (_buffer): window 1.30x (EPYC);
# - for correctness, a block with a non-finite input is cut into rows (_split): inf and NaN reach
#   only what they reach in naive, where textbook's 0 * NaN at a non-edge spreads them.
DenseCache = namedtuple("DenseCache", "qh kh vh o lse bias g block_rows bad")
_TILE = 512         # key columns per tile, of 256, 512, 1024 the fastest on long and causal (EPYC)
_LAZY = 16          # a row's shift moves only when its max passes it by more: sums stay < e^16 C


# A block: rows, a slice of R targets; cols, their C sources, a slice or a sorted array; ragged, a
# slice of cols where some pair is not an edge, or None; tiles, its key tiles, once prepared.
# A tile: cols, C and ragged as a block's; mask (R, ragged), 0 at edges, else -inf; with a bias,
# edges, (e, r, c): its edges' CSR positions and their (row, column) in the tile.
Block = namedtuple("Block", "rows cols ragged R C tiles", defaults=[None])
Tile = namedtuple("Tile", "cols ragged C mask edges")
# The plan: the blocks; forward and backward, per thread its units of work, (heads, block numbers);
# scratch, the elements of each per-thread buffer, for the largest tile any unit meets.
Plan = namedtuple("Plan", "blocks forward backward scratch")


def dense_blocks(g, block_rows=None):
    """The blocks of target rows, built once per graph, a batch's graphs whole where they fit: rows
    256 where targets average 256 in-edges or more, else 128 (smaller wastes less on windows)."""
    R = block_rows or (256 if g.num_edges >= 256 * g.num_nodes else 128)

    def build():
        cuts = [0]
        for a, b in zip(g.ptr[:-1], g.ptr[1:]):     # graph [a, b) of a batch
            if b - cuts[-1] > R and a > cuts[-1]:
                cuts.append(a)                        # start a block with this graph
            cuts += range(cuts[-1] + R, b, R)         # cut a graph larger than R rows
        if g.num_nodes > cuts[-1]:
            cuts.append(g.num_nodes)
        for r0, r1 in zip(cuts[:-1], cuts[1:]):
            if g.ranges is None:
                yield _general_block(g, r0, r1)
            else:
                yield _structured_block(g, r0, r1)
    return _derived(g, ("dense", R), lambda: list(build()))


def _general_block(g, r0, r1):          # columns: the sources of the rows' edges
    indptr, src, _ = _csr(g)
    cols = np.unique(src[indptr[r0]:indptr[r1]])
    C = cols.size
    ragged = None if indptr[r1] - indptr[r0] == (r1 - r0) * C else slice(0, C)
    if C and cols[-1] - cols[0] + 1 == C:                       # contiguous: a view, not a gather
        cols = slice(cols[0], cols[-1] + 1)
    return Block(slice(r0, r1), cols, ragged, r1 - r0, C)


def _structured_block(g, r0, r1):       # columns: the union of the rows' ranges
    lo, hi = g.ranges[0][r0:r1], g.ranges[1][r0:r1]
    c0, c1 = lo.min(), hi.max()
    f0, f1 = lo.max(), hi.min()                     # [f0, f1): in every row's range
    gaps = [(c0, f0), (f1, c1)] if f0 < f1 else [(c0, c1)]
    if not g.self_loops:
        gaps.append((max(r0, c0), min(r1, c1)))     # the diagonal
    gaps = [(a - c0, b - c0) for a, b in gaps if a < b]
    ragged = slice(min(a for a, _ in gaps), max(b for _, b in gaps)) if gaps else None
    return Block(slice(r0, r1), slice(c0, c1), ragged, r1 - r0, c1 - c0)


def _tile_cuts(C):
    """[(t0, t1)]: C columns in C // _TILE key tiles of equal width, _TILE to 2 _TILE columns: a
    tile's scores stay in the cache while passes 1-4 run on them. Narrower than 2 _TILE, one tile:
    two would save less than the online softmax's bookkeeping costs (small 13% slower)."""
    count = max(1, C // _TILE)
    width = max(1, math.ceil(C / count))
    return [(t0, min(t0 + width, C)) for t0 in range(0, max(C, 1), width)]   # C = 0: one, empty


def _plan(g, n_heads, d_head, block_rows=None):
    """The plan of dense on g, made once per graph, H, dh, block rows, tile width and thread count,
    from dense_blocks alone: cheap, and choose_backend and dense_bytes read it too."""
    threads = nb.get_num_threads()

    def build():
        return _make_plan(dense_blocks(g, block_rows), n_heads, d_head, threads)
    return _derived(g, ("plan", n_heads, d_head, block_rows, _TILE, threads), build)


def _make_plan(blocks, H, dh, threads):
    """Units of work: a group of heads and one block (forward), or the blocks that share columns
    (backward, so that one unit writes their dk, dv rows). Heads are cut into the fewest groups
    that give every thread 2 units, if H allows; each unit, largest first, goes to the thread
    with the least work so far (LPT), its work its blocks' pairs times its heads."""
    forward = _split_work([[n] for n in range(len(blocks))], blocks, H, threads)
    backward = _split_work(_sharing_columns(blocks), blocks, H, threads)
    R = max([b.R for b in blocks], default=0)
    tile_cells, tile_cols = 0, 0
    for b in blocks:
        for t0, t1 in _tile_cuts(b.C):
            tile_cells = max(tile_cells, b.R * (t1 - t0))
            tile_cols = max(tile_cols, t1 - t0)
    fh, bh = (max([h.stop - h.start for run in runs for h, _ in run], default=0)
              for runs in (forward, backward))                          # the most heads in a unit
    scratch = dict(s=max(fh, bh) * tile_cells, bias=max(fh, bh) * tile_cells,
                   pv=fh * R * (dh + 1), pv_tile=fh * R * (dh + 1),     # the forward's
                   dp=bh * tile_cells, t=bh * tile_cols * dh, dq_tile=bh * R * dh)  # backward's
    return Plan(blocks, forward, backward, scratch)


def _split_work(groups, blocks, H, threads):
    """Per thread, its units (heads, block numbers): each group of blocks with each head group, the
    heads in the fewest groups that keep every thread within 10% of the mean (fewer, larger calls),
    else in H groups."""
    for k in range(1, H + 1):
        heads = [slice(a * H // k, (a + 1) * H // k) for a in range(k)]
        units = [(h, group) for group in groups for h in heads]
        work = [(h.stop - h.start) * sum(blocks[n].R * blocks[n].C for n in group)
                for h, group in units]
        runs, load = [[] for _ in range(threads)], [0] * threads
        for u in np.argsort(work, kind="stable")[::-1]:
            t = int(np.argmin(load))
            runs[t].append(units[u])
            load[t] += work[u]
        if max(load, default=0) <= 1.1 * np.mean(load):
            break
    return runs


def _sharing_columns(blocks):
    """Lists of block numbers, each list's columns apart from every other list's: blocks whose
    column spans overlap go in one list, in block order (the order a unit adds them in); a block
    without columns alone (it writes only its rows' dq, zeros)."""
    spans, groups = [], []
    for n, b in enumerate(blocks):
        if b.C == 0:
            groups.append([n])
        elif isinstance(b.cols, slice):
            spans.append((b.cols.start, b.cols.stop - 1, n))
        else:
            spans.append((b.cols[0], b.cols[-1], n))
    end = -1
    for first, last, n in sorted(spans):
        if first > end:
            groups.append([])
        groups[-1].append(n)
        end = max(end, last)
    return [sorted(group) for group in groups]


def _prepared(g, block_rows, bias):
    """dense_blocks with their tiles, each with its share of the block's mask and, with a bias,
    where its edges' entries go: built on the first dense call (choose_backend needs none)."""
    def build():
        return [_tiled(g, b, bias) for b in dense_blocks(g, block_rows)]
    return _derived(g, ("prepared", block_rows, _TILE, bias), build)


def _tiled(g, b, bias):
    """Block b with its key tiles (_tile_cuts). A bias entry is matched to its pair by position:
    the CSR lists a row's edges by source, the order of the edge mask's nonzero (checked)."""
    cols = b.cols
    edge, mask, e, r, c = None, None, None, None, None
    if b.ragged is not None or bias:
        cols = np.r_[b.cols]
        edge = _edge_mask(g, b, cols)                                    # (R, C)
    if b.ragged is not None:
        mask = np.where(edge[:, b.ragged], 0, -np.inf).astype(np.float32)  # (R, ragged)
    if bias:
        r, c = np.nonzero(edge)
        indptr = _csr_indptr(g)
        e = np.arange(indptr[b.rows.start], indptr[b.rows.stop])
        if g.ranges is None and not np.array_equal(cols[c], _csr(g).src[e]):     # structured: so
            raise AssertionError("dense: a block's edges are not in CSR order")   # by construction
    tiles = []
    for t0, t1 in _tile_cuts(b.C):
        if isinstance(b.cols, slice):
            tile_cols = slice(b.cols.start + t0, b.cols.start + t1)
        else:
            tile_cols = b.cols[t0:t1]
        ragged, tile_mask, edges = None, None, None
        if b.ragged is not None and max(b.ragged.start, t0) < min(b.ragged.stop, t1):
            a, z = max(b.ragged.start, t0), min(b.ragged.stop, t1)
            ragged = slice(a - t0, z - t0)
            tile_mask = mask[:, a - b.ragged.start:z - b.ragged.start]
        if bias:
            inside = (c >= t0) & (c < t1)
            edges = (e[inside], r[inside], c[inside] - t0)
        tiles.append(Tile(tile_cols, ragged, t1 - t0, tile_mask, edges))
    return b._replace(tiles=tiles)


def dense_bytes(g, n_heads, d_head, dtype, edge_bias=False, block_rows=None, d_model=None):
    """Bytes one forward plus backward of the layer with dense needs beyond x, params and dy, with
    D = d_model or H dh, at the backward's peak: the layer's arrays (_layer_bytes) but q, k, v,
    which the backward reads heads first; q, k, v and do heads first, (H, N, dh + 1), and dk, dv
    so, (H, N, dh); each thread's buffers, as the plan sizes them; float32 masks; with a bias, its
    copies in CSR order and each edge's place in its tile."""
    N, H, dh = g.num_nodes, n_heads, d_head
    item = np.dtype(dtype).itemsize
    plan = _plan(g, H, dh, block_rows)
    scratch = sum(n for name, n in plan.scratch.items() if edge_bias or name != "bias")
    need = (4 * H * N * (dh + 1) - H * N * dh + nb.get_num_threads() * scratch) * item   # 2 - 3
    for b in plan.blocks:
        if b.ragged is not None:
            need += 4 * b.R * (b.ragged.stop - b.ragged.start)
    if edge_bias:
        need += 3 * g.num_edges * H * item + 6 * 8 * g.num_edges      # positions: block's, tiles'
    return _layer_bytes(N, H, dh, d_model, dtype) + need


def _edge_mask(g, b, cols):
    """(R, C) bool: True where row r of block b and source cols[c] are an edge."""
    if g.ranges is None:
        mask = np.zeros((b.R, cols.size), bool)
        indptr, src, _ = _csr(g)
        counts = np.diff(indptr[b.rows.start:b.rows.stop + 1])          # (R,) in-edges
        src = src[indptr[b.rows.start]:indptr[b.rows.stop]]
        mask[np.repeat(np.arange(b.R), counts), np.searchsorted(cols, src)] = True
        return mask
    mask = (cols >= g.ranges[0][b.rows, None]) & (cols < g.ranges[1][b.rows, None])
    if not g.self_loops:
        mask &= cols != np.r_[b.rows][:, None]                         # not i -> i
    return mask


def _heads_first(arrays, scales):
    """For each (N, H, dh) a, on a thread each: a * scale heads first, (H, N, dh + 1), with a last
    column of ones to ride in the matmuls; and whether they may hold an inf or NaN (a sum is not
    finite: also when finite entries overflow it, and then _nonfinite finds no node)."""
    def copy(task):
        a, scale = task
        out = np.empty((a.shape[1], a.shape[0], a.shape[2] + 1), a.dtype)
        np.multiply(a.transpose(1, 0, 2), scale, out=out[..., :-1])
        out[..., -1] = 1
        return out, not np.isfinite(out.sum())
    done = _map_threads(copy, list(zip(arrays, scales)))
    return [d[0] for d in done], any(d[1] for d in done)


def _scores(qh, kh, bias, heads, rows, tile, s, scratch):
    """Pass 1 for a tile of rows: s (h, R, C) = qh[heads, rows] kh[heads, cols]^T, + bias at edges
    and -inf at non-edges. qh, kh (H, N, dh + 1): q and k / sqrt(dh), heads first, with their last
    columns."""
    np.matmul(qh[heads, rows], kh[heads, tile.cols].transpose(0, 2, 1), out=s)
    if bias is not None:            # bias at edges, -inf elsewhere; a NaN s is kept off by _split
        full = scratch["bias"][:s.size].reshape(s.shape)
        full[:] = -np.inf
        e, r, c = tile.edges
        full[:, r, c] = bias[e, heads].T
        s += full
    elif tile.ragged is not None:
        s[:, :, tile.ragged] += tile.mask
    return s


def _split(blocks, g, bad, bias):
    """Blocks with a non-finite input and a non-edge pair, cut into a block per row over its own
    sources: inf and NaN reach only what naive lets them (0 * NaN through a non-edge would not)."""
    out = []
    for b in blocks:
        if bad is None or b.ragged is None or not (bad[b.rows].any() or bad[b.cols].any()):
            out.append(b)
            continue
        sources = np.r_[b.cols]
        for i in range(b.rows.start, b.rows.stop):
            row = Block(slice(i, i + 1), sources, None, 1, sources.size)
            cols = sources[_edge_mask(g, row, sources)[0]]
            out.append(_tiled(g, Block(row.rows, cols, None, 1, cols.size), bias))
    return out


def _work(g, H, dh, block_rows, bias, bad):
    """The plan and its prepared blocks; with a non-finite input, a plan of this call's own."""
    plan = _plan(g, H, dh, block_rows)
    blocks = _prepared(g, block_rows, bias is not None)
    if bad is None:
        return plan, blocks
    blocks = _split(blocks, g, bad, bias is not None)
    return _make_plan(blocks, H, dh, nb.get_num_threads()), blocks


def _buffers(plan, dtype, bias):
    """This thread's scratch arrays, as the plan sizes them (the bias tile only with a bias)."""
    return {name: _buffer("dense " + name, n, dtype) for name, n in plan.scratch.items()
            if bias is not None or name != "bias"}


def _nonfinite(*arrays, bad=None):
    """(N,) bool: nodes with an inf or NaN in any of the (N, ...) arrays, or in bad."""
    found = ~np.logical_and.reduce([np.isfinite(a).all(tuple(range(1, a.ndim))) for a in arrays])
    if bad is None:
        return found
    return found | bad


def dense_forward(q, k, v, bias, g, block_rows=None):
    N, H, dh = q.shape
    need = dense_bytes(g, H, dh, q.dtype, bias is not None, block_rows) - _held_bytes("dense")
    _check_memory(need, f"dense backend (N={N}, H={H})",
                  "; use smaller block_rows or backend='sparse'")
    bias = _to_csr(bias, g)                        # (E, H) blocks read their edges in CSR order
    o = np.empty_like(q)                                                # (N, H, dh)
    lse = np.empty((N, H), q.dtype)                                     # (N, H) m + log l
    (qh, kh, vh), maybe_bad = _heads_first((q, k, v), (1, 1 / math.sqrt(dh), 1))   # (H, N, dh + 1)
    bad = None
    if maybe_bad:
        bad = _nonfinite(q, k, v)
    plan, blocks = _work(g, H, dh, block_rows, bias, bad)

    def units(run):                                 # this thread's units: (heads, [one block])
        scratch = _buffers(plan, q.dtype, bias)
        for heads, (n,) in run:
            b = blocks[n]
            h = heads.stop - heads.start
            pv = scratch["pv"][:h * b.R * (dh + 1)].reshape(h, b.R, dh + 1)
            m = np.zeros((h, b.R), q.dtype)                              # (h, R) the rows' shift
            for number, tile in enumerate(b.tiles):
                _stop_point()
                s = scratch["s"][:h * b.R * tile.C].reshape(h, b.R, tile.C)
                # pass 1: s - m = [q, -m] [k / sqrt(dh), 1]^T, -inf at non-edges (m = 0 at first)
                qh[heads, b.rows, dh] = -m
                _scores(qh, kh, bias, heads, b.rows, tile, s, scratch)   # (h, R, C)
                if number == 0:
                    # pass 2: each row's max m, 0 in rows without an edge yet, subtracted
                    m = s.max(-1, initial=-np.inf)                       # (h, R)
                    empty = m == -np.inf
                    m[empty] = 0
                    np.subtract(s, m[..., None], out=s)
                else:
                    # pass 2, online: a row's m moves only where this tile's max passes it by
                    # _LAZY, or where the row meets its first edges; the sums so far scale to match
                    t = s.max(-1, initial=-np.inf)                       # (h, R) max of s - m
                    move = ((t > _LAZY) | empty) & (t > -np.inf)
                    if move.any():
                        d = np.where(move, t, 0)                         # (h, R)
                        np.subtract(s, d[..., None], out=s)
                        pv *= np.exp(-np.where(empty, 0, d))[..., None]  # empty rows' pv is 0
                        m += d
                        empty &= ~move
                # pass 3: exp(s - m); with pass 4's P V: [P V, l] = exp(s - m) [v, 1], summed
                # over the tiles, P unnormalised
                if number == 0:
                    np.matmul(np.exp(s, out=s), vh[heads, tile.cols], out=pv)     # (h, R, dh + 1)
                else:
                    pv_tile = scratch["pv_tile"][:pv.size].reshape(pv.shape)
                    pv += np.matmul(np.exp(s, out=s), vh[heads, tile.cols], out=pv_tile)
            l = pv[..., dh]                                              # (h, R)
            l[l == 0] = 1                       # l >= 1 unless a row has no edge: then o = 0 / 1
            # pass 4: o = P V / l
            np.divide(pv[..., :dh].transpose(1, 0, 2), l.T[..., None], out=o[b.rows, heads])
            lse[b.rows, heads] = (m + np.log(l)).T      # P = exp(s - lse)
    _map_threads(units, plan.forward)
    qh[..., dh] = -lse.T                               # for the backward: [q, -lse] k^T = s - lse
    return o, DenseCache(qh, kh, vh, o, lse, bias, g, block_rows, bad)


def dense_backward(do, cache, dq, dk, dv):
    qh, kh, vh, o, lse, bias, g, block_rows, bad = cache
    N, H, dh = do.shape
    ds_edges = None                                 # (E, H) CSR order, with a bias
    if bias is not None:
        ds_edges = np.empty_like(bias)
    (doh,), maybe_bad = _heads_first((do,), (1,))   # (H, N, dh + 1): [do, -delta] below
    if bad is not None or bias is not None or maybe_bad:    # a bias's inf shows in o
        bad = _nonfinite(o, do, bad=bad)
    plan, blocks = _work(g, H, dh, block_rows, bias, bad)
    doh[..., dh] = -np.einsum("nhd,nhd->hn", do, o)    # delta = rowsum(P dP) = <do, o>
    dkv = _buffer("dense dkv", 2 * dk.size, dk.dtype).reshape(2, H, N, dh)
    dkv[:] = 0
    dkh, dvh = dkv                  # (H, N, dh) each: a unit alone adds into its rows, in order

    def units(run):                 # this thread's units: (heads, the blocks that share columns)
        scratch = _buffers(plan, do.dtype, bias)
        for heads, group in run:
            h = heads.stop - heads.start
            for b in (blocks[n] for n in group):
                dq_rows = dq[b.rows, heads].transpose(1, 0, 2)          # (h, R, dh) a view
                for number, tile in enumerate(b.tiles):
                    _stop_point()
                    s = scratch["s"][:h * b.R * tile.C].reshape(h, b.R, tile.C)
                    dp = scratch["dp"][:s.size].reshape(s.shape)
                    t = scratch["t"][:h * tile.C * dh].reshape(h, tile.C, dh)
                    # passes 1-4 again: P = exp([q, -lse] [k / sqrt(dh), 1]^T) = exp(s - lse)
                    _scores(qh, kh, bias, heads, b.rows, tile, s, scratch)
                    p = np.exp(s, out=s)                                 # (h, R, C)
                    # backward of pass 4's o = P V: dV = P^T do, and [do, -delta] [v, 1]^T =
                    # dP - delta
                    np.matmul(p.transpose(0, 2, 1), doh[heads, b.rows, :dh], out=t)
                    dvh[heads, tile.cols] += t
                    np.matmul(doh[heads, b.rows], vh[heads, tile.cols].transpose(0, 2, 1), out=dp)
                    # backward of the softmax, passes 2-4's P: dS = P (dP - delta)
                    ds = np.multiply(dp, p, out=dp)                      # (h, R, C)
                    if bias is not None:
                        e, r, c = tile.edges
                        ds_edges[e, heads] = ds[:, r, c].T
                    # backward of pass 1, s = q k^T / sqrt(dh): dQ = dS (k / sqrt(dh)), dK = dS^T
                    # q, whose 1 / sqrt(dh) is applied once, at the end
                    np.matmul(ds.transpose(0, 2, 1), qh[heads, b.rows, :dh], out=t)
                    dkh[heads, tile.cols] += t
                    if number == 0:
                        np.matmul(ds, kh[heads, tile.cols, :dh], out=dq_rows)
                    else:
                        dq_tile = scratch["dq_tile"][:h * b.R * dh].reshape(h, b.R, dh)
                        dq_rows += np.matmul(ds, kh[heads, tile.cols, :dh], out=dq_tile)
    _map_threads(units, plan.backward)

    def out(task):                          # dk, then dv: heads first to (N, H, dh)
        acc, target, scale = task
        np.multiply(acc, scale, out=target.transpose(1, 0, 2))
    _map_threads(out, [(dkh, dk, 1 / math.sqrt(dh)), (dvh, dv, 1)])
    if bias is None:
        return None
    return _input_order(ds_edges, g)


# ---------------------------------------------------------------- sparse
# sparse_forward is naive_forward, otherwise identical, except:
# - Numba kernels over the edges grouped by target (the CSR), compiled nogil and run on gtx's
#   threads, a range of targets each (not OpenMP's: GNU OpenMP kills a forked child using it);
# - key and value gradients land on sources: a second pass over the transposed CSR makes them, not
#   racing; one thread sums each node, in a fixed order: the same bits for any thread count;
# - kernels prefetch the rows of the edge _AHEAD on: sparse 1.68x, powerlaw 1.25x (EPYC);
# - sums may be reordered to vectorise (_REASSOC) and divisions, never by 0, go unchecked
#   (error_model="numpy"), as Numba compiles prange loops.
SparseCache = namedtuple("SparseCache", "qkv o alpha g has_bias")
_REASSOC = {"reassoc", "contract"}    # Numba may reorder and fuse sums to vectorise; inf, NaN kept
SparseIndex = namedtuple("SparseIndex", "t_indptr t_pos t_dst")


def sparse_bytes(g, n_heads, d_head, dtype, edge_bias=False, d_model=None):
    """Bytes one forward plus backward of the layer with sparse needs beyond x, params and dy, with
    D = d_model or H dh: the layer's arrays (_layer_bytes); alpha and ds, (E, H) (a bias: its
    copy too); the graph's index arrays (CSR, transpose), about 48 bytes per edge, built once."""
    item = np.dtype(dtype).itemsize
    per_edge = (2 + 2 * edge_bias) * n_heads * item + 48
    return _layer_bytes(g.num_nodes, n_heads, d_head, d_model, dtype) + g.num_edges * per_edge


def _sparse_index(g):
    """The CSR by source: out-edges of j as positions in the target CSR, built once per graph."""
    def build():
        indptr, src, _ = _csr(g)
        t_pos = np.argsort(src, kind="stable")                          # (E,)
        dst = np.repeat(np.arange(g.num_nodes), np.diff(indptr))        # (E,) targets, CSR order
        return SparseIndex(_indptr(src, g.num_nodes), t_pos, dst[t_pos])
    return _derived(g, "sparse", build)


@nb.njit(nogil=True, cache=True, fastmath=_REASSOC, error_model="numpy")
def _sparse_forward_kernel(qkv, bias, indptr, src, i0, i1, o, alpha):
    """o[i0:i1] and the alpha of their in-edges."""
    N, _, H, dh = qkv.shape
    scale = qkv.dtype.type(1 / np.sqrt(dh))
    m, den = np.empty(H, qkv.dtype), np.empty(H, qkv.dtype)         # (H,) target's max and sum
    acc = np.empty((H, dh), qkv.dtype)                              # (H, dh) o_i, unnormalised
    for i in range(i0, i1):
        m[:] = np.finfo(qkv.dtype).min      # not -inf: scores all -inf (a masking bias) give 0
        den[:] = 0
        acc[:] = 0
        # passes 1 and 2: scores s = <q_i, k_j> / sqrt(dh) + bias, into alpha's buffer; their max m
        for e in range(indptr[i], indptr[i + 1]):
            if e + _AHEAD < src.size:
                _prefetch_bytes(qkv, src[e + _AHEAD], qkv[0, 0].nbytes, qkv[0].nbytes)
            j = src[e]
            for h in range(H):
                s = qkv.dtype.type(0)
                for d in range(dh):
                    s += qkv[i, 0, h, d] * qkv[j, 1, h, d]
                s = s * scale + (0 if bias is None else bias[e, h])
                alpha[e, h] = s
                m[h] = max(m[h], s)
        # pass 3: exp(s - m) into alpha's buffer, summed in den; pass 4's P V, unnormalised
        for e in range(indptr[i], indptr[i + 1]):
            j = src[e]
            for h in range(H):
                p = np.exp(alpha[e, h] - m[h])
                alpha[e, h] = p
                den[h] += p
                for d in range(dh):
                    acc[h, d] += p * qkv[j, 2, h, d]
        # pass 4: normalise once: alpha = exp / den, o_i = acc / den (no in-edges: 0 / 1)
        for h in range(H):
            den[h] = max(den[h], 1)
            for e in range(indptr[i], indptr[i + 1]):
                alpha[e, h] /= den[h]
            for d in range(dh):
                o[i, h, d] = acc[h, d] / den[h]


def sparse_forward(q, k, v, bias, g):
    H, dh = q.shape[1:]
    need = sparse_bytes(g, H, dh, q.dtype, bias is not None) - _held_bytes("sparse")
    _check_memory(need, f"sparse backend ({g.num_edges:,} edges)")
    qkv, bias = _packed(q, k, v), _to_csr(bias, g)                     # (N, 3, H, dh)
    csr = _csr(g)
    o, alpha = np.empty_like(q), np.empty((g.num_edges, H), q.dtype)   # (N, H, dh), (E, H)

    def targets(nodes):
        _sparse_forward_kernel(qkv, bias, csr.indptr, csr.src, *nodes, o, alpha)
    _map_threads(targets, _node_ranges(g))
    return o, SparseCache(qkv, o, alpha, g, bias is not None)  # alpha (E, H) kept for the backward


@nb.njit(nogil=True, cache=True, fastmath=_REASSOC, error_model="numpy")
def _sparse_backward_targets(do, qkv, o, alpha, dqkv, ds, indptr, src, i0, i1):
    """ds (E, H), and dq into dqkv[:, 0], for targets i0:i1: every write lands on their rows."""
    N, _, H, dh = qkv.shape
    scale = qkv.dtype.type(1 / np.sqrt(dh))
    for i in range(i0, i1):
        for h in range(H):
            delta = qkv.dtype.type(0)               # sum_e alpha_e dalpha_e = <do_i, o_i>
            for d in range(dh):
                delta += do[i, h, d] * o[i, h, d]
                dqkv[i, 0, h, d] = 0
            for e in range(indptr[i], indptr[i + 1]):
                if h == 0 and e + _AHEAD < src.size:        # once per edge: h is the outer loop
                    _prefetch_bytes(qkv, src[e + _AHEAD], qkv[0, 0].nbytes, qkv[0].nbytes)
                # backward of pass 4's sum, o_i = sum_e alpha_e v_j: dalpha_e = <do_i, v_j>
                j, da = src[e], qkv.dtype.type(0)
                for d in range(dh):
                    da += do[i, h, d] * qkv[j, 2, h, d]
                # backward of the softmax (passes 2-4); of pass 1, s = <q_i, k_j> / sqrt(dh)
                ds[e, h] = alpha[e, h] * (da - delta)
                for d in range(dh):
                    dqkv[i, 0, h, d] += ds[e, h] * scale * qkv[j, 1, h, d]


@nb.njit(nogil=True, cache=True, fastmath=_REASSOC, error_model="numpy")
def _sparse_backward_sources(do, qkv, alpha, ds, dqkv, t_indptr, t_pos, t_dst, j0, j1):
    """dk and dv into dqkv[:, 1:] for sources j0:j1, over the transposed CSR: writes land on j."""
    N, _, H, dh = qkv.shape
    scale = qkv.dtype.type(1 / np.sqrt(dh))
    for j in range(j0, j1):
        dqkv[j, 1:] = 0
        for t in range(t_indptr[j], t_indptr[j + 1]):
            if t + _AHEAD < t_pos.size:             # q, do, alpha and ds of an edge soon needed
                i_next, e_next = t_dst[t + _AHEAD], t_pos[t + _AHEAD]
                _prefetch_bytes(qkv, i_next, 0, qkv[0, 0].nbytes)
                _prefetch_bytes(do, i_next, 0, do[0].nbytes)
                _prefetch(alpha, e_next, 0)
                _prefetch(ds, e_next, 0)
            e, i = t_pos[t], t_dst[t]               # e: the edge's position in the target CSR
            for h in range(H):          # backward of pass 1 (dk), of pass 4 (dv)
                dk_scale, dv_scale = ds[e, h] * scale, alpha[e, h]
                for d in range(dh):
                    dqkv[j, 1, h, d] += dk_scale * qkv[i, 0, h, d]
                    dqkv[j, 2, h, d] += dv_scale * do[i, h, d]


def sparse_backward(do, cache, dq, dk, dv):
    qkv, o, alpha, g, has_bias = cache
    idx, dqkv = _sparse_index(g), _packed(dq, dk, dv)                  # (N, 3, H, dh)
    csr = _csr(g)
    ds = (np.empty_like(alpha) if has_bias    # (E, H): returned with a bias, else kept scratch
          else _buffer("sparse ds", alpha.size, alpha.dtype).reshape(alpha.shape))

    def targets(nodes):
        _sparse_backward_targets(do, qkv, o, alpha, dqkv, ds, csr.indptr, csr.src, *nodes)

    def sources(nodes):                             # over the transposed CSR, once ds is whole
        _sparse_backward_sources(do, qkv, alpha, ds, dqkv, *idx, *nodes)
    _map_threads(targets, _node_ranges(g))
    _map_threads(sources, _node_ranges(g, by_source=True))
    if not np.shares_memory(dqkv, dq):             # _packed made a copy: write it back
        dq[:], dk[:], dv[:] = dqkv[:, 0], dqkv[:, 1], dqkv[:, 2]
    return _input_order(ds, g) if has_bias else None


# ---------------------------------------------------------------- choose_backend
# The engine's backends, the ones auto chooses between; textbook and naive are for reading.
BACKENDS.update(dense=Backend(dense_forward, dense_backward),
                sparse=Backend(sparse_forward, sparse_backward))


# Seconds of the attention alone (forward and backward, float32, no bias, 2 threads of a 2-core
# Xeon) fitted on 28 graphs: per call, key tile (fitted per block, when a block was one tile), node,
# (row, column) pair or edge and head, and MAC.
COST = dict(dense_call=1.0e-3, dense_tile=2.2e-4, dense_pair=2.9e-9, dense_mac=4.2e-11,
            sparse_call=2.2e-4, sparse_edge=1.0e-8, sparse_mac=4.9e-10, sparse_node=2.4e-7)


def choose_backend(g, n_heads, d_head, dtype=np.float32, edge_bias=False):
    """("dense" or "sparse", {backend: estimated seconds of the attention, forward and backward}):
    dense pays for every (row, column) pair of its blocks, sparse for every edge, more per unit.
    A backend whose memory does not fit gets inf: auto never picks one that would MemoryError.
    This replaces Part 1's choose_backend, of the plain backends, as auto's pick."""
    H, dh, c = n_heads, d_head, COST
    scale = np.dtype(dtype).itemsize / 4                # float64 costs about twice float32
    blocks = _plan(g, H, dh).blocks
    pairs = sum(b.R * b.C for b in blocks)                              # dense's (row, column)s
    tiles = sum(len(_tile_cuts(b.C)) for b in blocks)                   # key tiles
    cost = {"dense": c["dense_call"] + c["dense_tile"] * tiles
            + scale * H * pairs * (c["dense_pair"] + dh * c["dense_mac"]),
            "sparse": c["sparse_call"] + scale * g.num_nodes * c["sparse_node"]
            + scale * H * g.num_edges * (c["sparse_edge"] + dh * c["sparse_mac"])}
    for name, need in (("dense", dense_bytes(g, H, dh, dtype, edge_bias)),
                       ("sparse", sparse_bytes(g, H, dh, dtype, edge_bias))):
        cost[name] = math.inf if need - _held_bytes(name) > available_bytes() else cost[name]
    return min(cost, key=cost.get), cost


# ---------------------------------------------------------------- torch maps
# A block's params under torch.nn.TransformerEncoderLayer.state_dict()'s names. A torch Linear
# keeps (out, in) weights, the transposes of W1, W2 and Wo's (in, out); in_proj stacks Wq, Wk, Wv's.
TORCH_NAMES = dict(bo="self_attn.out_proj.bias", W1="linear1.weight", b1="linear1.bias",
                   W2="linear2.weight", b2="linear2.bias", ln1_w="norm1.weight",
                   ln1_b="norm1.bias", ln2_w="norm2.weight", ln2_b="norm2.bias")
TORCH_QKV = ("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight")


def block_to_torch(params):
    """{state_dict name: a new NumPy array}, to load with torch.from_numpy; torch needs D = H dh."""
    p = {key: np.asarray(params[key]) for key in BLOCK_KEYS}
    D, H, dh = p["Wq"].shape
    sd = {name: p[key].copy() for key, name in TORCH_NAMES.items()}
    sd["linear1.weight"], sd["linear2.weight"] = p["W1"].T.copy(), p["W2"].T.copy()
    sd[TORCH_QKV[0]] = np.concatenate([p[w].reshape(D, H * dh).T for w in ("Wq", "Wk", "Wv")])
    sd[TORCH_QKV[1]] = np.concatenate([p[b].reshape(H * dh) for b in ("bq", "bk", "bv")])
    sd[TORCH_QKV[2]] = p["Wo"].reshape(H * dh, D).T.copy()               # (D, H dh)
    return sd


def block_from_torch(state_dict, n_heads):
    """block_to_torch's inverse: new NumPy params from a state_dict (arrays, detached tensors)."""
    missing = [name for name in (*TORCH_NAMES.values(), *TORCH_QKV) if name not in state_dict]
    if missing:
        raise ValueError(f"state_dict is missing {missing}")
    sd = {name: np.asarray(state_dict[name]).copy() for name in (*TORCH_NAMES.values(), *TORCH_QKV)}
    D = sd["norm1.weight"].size
    H = _count("n_heads", n_heads, 1)
    if sd[TORCH_QKV[0]].shape != (3 * D, D) or D % H:
        raise ValueError(f"in_proj_weight must be (3 D, D), D = {D} a multiple of n_heads = {H}, "
                         f"got {sd[TORCH_QKV[0]].shape}")
    p = {key: sd[name] for key, name in TORCH_NAMES.items()}
    p["W1"], p["W2"] = p["W1"].T.copy(), p["W2"].T.copy()
    for n, c in enumerate("qkv"):                   # in_proj's rows n D : (n + 1) D, (out, in)
        p["W" + c] = sd[TORCH_QKV[0]][n * D:(n + 1) * D].T.reshape(D, H, D // H)   # of sd's copy
        p["b" + c] = sd[TORCH_QKV[1]][n * D:(n + 1) * D].reshape(H, D // H)
    p["Wo"] = sd[TORCH_QKV[2]].T.reshape(H, D // H, D)
    return _check_params(p, D, None, BLOCK_KEYS)                        # linear1, linear2's shapes


# ---------------------------------------------------------------- plumbing
# What serves speed or safety but teaches nothing about attention: the layer on gtx's threads,
# prefetch, MXCSR, the BLAS hold, threads, buffers and split matmuls.

def _engine_forward(x, g, p, backend, edge_bias):
    """forward for dense and sparse, otherwise identical, except (time without each / with, EPYC):
    - BLAS on one thread while gtx's threads split the work (_one_blas_thread): powerlaw 2.12x,
      window 1.65x, long 1.55x;
    - q, k, v as one (N, 3 H dh) matmul, which _matmuls cuts across gtx's threads, and y's too
      (_project): peaked attention 1.80x, transformer 1.60x, causal 1.36x."""
    N, D = x.shape
    _, H, dh = p["Wq"].shape
    with _one_blas_thread():
        q, k, v = _project(x, p)                                        # (N, H, dh) each
        o, attention = BACKENDS[backend].forward(q, k, v, edge_bias, g)
        y = _matmuls(Product(o.reshape(N, H * dh), p["Wo"].reshape(H * dh, D), add=p["bo"]))[0]
    return y, Cache(backend, x, p, o, attention, edge_bias)


def _engine_backward(dy, cache):
    """backward for dense and sparse, with _engine_forward's exceptions; do and dq, dk, dv in
    per-thread buffers, and dq, dk, dv as one (N, 3, H, dh) array, as the sparse kernels want."""
    backend, x, p, o, attention, edge_bias = cache
    N = len(x)
    H, dh, D = p["Wo"].shape
    with _one_blas_thread():
        # backward of y = o Wo + bo
        dWo, do = _matmuls(Product(o.reshape(N, H * dh).T, dy), Product(
            dy, p["Wo"].reshape(H * dh, D).T, _buffer("do", N * H * dh, dy.dtype)))
        grads = {"Wo": dWo.reshape(H, dh, D), "bo": dy.sum(0)}
        do = do.reshape(N, H, dh)
        # backward of the attention, into the (N, 3, H, dh) gradients of q, k, v
        dqkv = _buffer("dqkv", 3 * N * H * dh, dy.dtype).reshape(N, 3, H, dh)
        ds = BACKENDS[backend].backward(do, attention, dqkv[:, 0], dqkv[:, 1], dqkv[:, 2])
        if edge_bias is not None:
            grads["edge_bias"] = ds                                     # s = ... + edge_bias
        dx = _project_backward(dqkv, x, p, grads)
    return dx, grads


def _engine_attention_weights(cache):
    """attention_weights for dense and sparse: sparse's own alpha (E, H), or, for dense, which keeps
    no per-edge array, the sparse kernels' recomputed."""
    g = cache.attention.g
    if cache.backend == "sparse":
        return _input_order(cache.attention.alpha, g)                   # a new array
    with _one_blas_thread():
        q, k, v = _project(cache.x, cache.params)                       # (N, H, dh) each
        alpha = sparse_forward(q, k, v, cache.edge_bias, g)[1].alpha    # (E, H) CSR order
    return _input_order(alpha, g)


# forward, backward and attention_weights hand dense and sparse to these (Part 1's LAYERS)
Layer = namedtuple("Layer", "forward backward attention_weights")
LAYERS.update(dense=Layer(_engine_forward, _engine_backward, _engine_attention_weights),
              sparse=Layer(_engine_forward, _engine_backward, _engine_attention_weights))


def _w_qkv(p):                          # [Wq Wk Wv] as one (D, 3 H dh) matrix
    D, H, dh = p["Wq"].shape
    return np.stack([p["Wq"], p["Wk"], p["Wv"]], 1).reshape(D, 3 * H * dh)


def _project(x, p):
    """q, k, v = x Wq + bq, x Wk + bk, x Wv + bv as one matmul: (N, H, dh) views of one
    (N, 3, H, dh) array, where a node's k and v sit side by side for the sparse kernels."""
    D, H, dh = p["Wq"].shape
    b = np.stack([p["bq"], p["bk"], p["bv"]]).reshape(-1)
    qkv = _matmuls(Product(x, _w_qkv(p), add=b))[0].reshape(-1, 3, H, dh)   # (N, 3, H, dh)
    return qkv[:, 0], qkv[:, 1], qkv[:, 2]


def _project_backward(dqkv, x, p, grads):
    """Differentiates _project given dqkv (N, 3, H, dh): dW*, db* into grads; returns dx (N, D)."""
    N, _, H, dh = dqkv.shape
    d = dqkv.reshape(N, 3 * H * dh)
    dW, dx = _matmuls(Product(x.T, d), Product(d, _w_qkv(p).T))       # (D, 3 H dh), (N, D)
    dW = dW.reshape(-1, 3, H, dh)                                       # (D, 3, H, dh)
    db = dqkv.sum(0)                                                    # (3, H, dh)
    for n, c in enumerate("qkv"):
        grads["W" + c], grads["b" + c] = dW[:, n], db[n]
    return dx


def _layer_bytes(N, n_heads, d_head, d_model, dtype):
    """Bytes of the layer's own arrays on the engine, D = d_model or H dh: q, k, v, o, do and the
    gradients of q, k, v (N, H, dh); y and dx (N, D); the weights' gradients."""
    H, dh = n_heads, d_head
    D = H * dh if d_model is None else d_model
    return (8 * N * H * dh + 2 * N * D + 4 * D * H * dh) * np.dtype(dtype).itemsize


def _node_ranges(g, by_source=False):
    """(start, stop) ranges of targets (or sources) of about equal work (edges + nodes), built once
    per graph and thread count: hubs spread, none is split. A thread takes a run of them, as many
    as keep each near _CHUNK of work (at most 64): between them, it can stop (_map_threads)."""
    def build():
        indptr = _sparse_index(g).t_indptr if by_source else _csr_indptr(g)
        work = indptr + np.arange(indptr.size)                          # (N+1,) increasing
        threads = nb.get_num_threads()
        n = threads * int(np.clip(work[-1] // (threads * _CHUNK), 1, 64))
        cuts = np.searchsorted(work, np.linspace(0, work[-1], n + 1)).tolist()
        return list(zip(cuts[:-1], cuts[1:]))
    return _derived(g, ("ranges", by_source, nb.get_num_threads()), build)


_CHUNK = 2**20          # edges and nodes a sparse kernel call takes at most, if it can: ~50 ms
_AHEAD = 8              # edges prefetched ahead: sparse 1.68x, powerlaw 1.25x faster than none
_LINE = 64                              # cache line bytes


@intrinsic
def _prefetch(typingctx, a, i, offset):
    """Starts loading the cache line at byte `offset` of row a[i] (LLVM's prefetch): a hint only."""
    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        index = [args[1]] + [context.get_constant(nb.types.intp, 0)] * (sig.args[0].ndim - 1)
        row = cgutils.get_item_pointer(context, builder, sig.args[0], arr, index)
        byte = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [byte] + [ir.IntType(32)] * 3), "llvm.prefetch.p0i8")
        builder.call(fn, [builder.gep(builder.bitcast(row, byte), [args[2]])]  # read, keep, data
                     + [ir.Constant(ir.IntType(32), c) for c in (0, 3, 1)])
        return context.get_dummy_value()
    return nb.types.void(a, i, offset), codegen


@nb.njit(inline="always")
def _prefetch_bytes(a, i, start, stop):                 # bytes start:stop of row a[i]
    for b in range(start, stop, _LINE):
        _prefetch(a, i, b)
    _prefetch(a, i, stop - 1)                           # the last line, when rows are not aligned


# While gtx's threads work, x86's MXCSR is 0x9FC0 (its default 0x1F80 | FTZ | DAZ): denormal floats
# count as 0. On an Intel Xeon, BLAS and exp slow ~100x on each, and peaked attention makes many
# (Wq, Wk x8: dense 522 -> 41 ms; an AMD EPYC did not slow). No library sets MXCSR from Python.
@intrinsic
def _swap_mxcsr(typingctx, value):      # x86: value into this thread's MXCSR; -> the old value
    def codegen(context, builder, sig, args):
        old, new = (cgutils.alloca_once_value(builder, args[0]) for _ in range(2))
        fn = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
        for op, slot in (("st", old), ("ld", new)):     # stmxcsr(&old), then ldmxcsr(&new)
            sse = cgutils.get_or_insert_function(builder.module, fn, f"llvm.x86.sse.{op}mxcsr")
            builder.call(sse, [builder.bitcast(slot, fn.args[0])])
        return builder.load(old)
    return nb.types.uint32(nb.types.uint32), codegen


@nb.njit(cache=True)
def _mxcsr(value):
    return _swap_mxcsr(value)


_NO_DENORMALS = np.uint32(0x9FC0) if platform.machine().lower() in ("x86_64", "amd64") else None


_BLAS = ThreadpoolController().select(user_api="blas").lib_controllers    # the loaded BLAS
_BLAS_HOLD = {"calls": 0, "lock": threading.Lock()}    # gtx calls running, the counts to restore


@contextlib.contextmanager
def _one_blas_thread():
    """BLAS on one thread while any gtx call runs (the first call in sets it, the last one out
    restores it); gtx's threads split the work instead: idle BLAS threads spin, idle ones sleep."""
    with _BLAS_HOLD["lock"]:
        if _BLAS_HOLD["calls"] == 0:
            _BLAS_HOLD["counts"] = [lib.num_threads for lib in _BLAS]
            _set_blas_threads([1] * len(_BLAS))
        _BLAS_HOLD["calls"] += 1
    try:
        yield
    finally:
        with _BLAS_HOLD["lock"]:
            _BLAS_HOLD["calls"] -= 1
            if _BLAS_HOLD["calls"] == 0:
                _set_blas_threads(_BLAS_HOLD["counts"])


def _set_blas_threads(counts):
    """Each BLAS's thread count, from any Python thread: for a pthreads OpenBLAS by its own setter,
    as threadpoolctl 3.8 changes it only from the first thread that did (gtx called from another
    thread kept BLAS's threads: other bits, and cores taken from gtx's threads)."""
    for lib, n in zip(_BLAS, counts):
        setter = None
        if lib.internal_api == "openblas" and lib.threading_layer != "openmp":
            setter = getattr(lib, "_get_symbol", _no_symbol)("openblas_set_num_threads")
        if setter is None:
            lib.set_num_threads(n)
        else:
            setter(n)


def _no_symbol(name):                   # a threadpoolctl without _get_symbol: its own setter
    return None


@functools.cache
def _python_threads(n):                # a pool per thread count, made on first use
    return ThreadPoolExecutor(n, thread_name_prefix=f"gtx{n}")     # threads gtx{n}_0, ...


def _after_fork_in_child():             # the parent's other threads, inside gtx or not, are gone
    _python_threads.cache_clear()
    _BLAS_HOLD.update(calls=0, lock=threading.Lock())
    _SCRATCH["lock"] = threading.Lock()


if hasattr(os, "register_at_fork"):     # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


_THREAD = threading.local()


class _Scratch:
    """One thread's buffers: arrays, by key; owner, the thread's ident, or a gtx thread's name."""

    def __init__(self, owner):
        self.owner = owner
        self.arrays = {}


_SCRATCH = {"all": weakref.WeakSet(), "lock": threading.Lock()}   # every live thread's _Scratch


def _buffer(key, n, dtype):
    """n elements of dtype from a buffer this thread keeps per key, valid until its next call with
    that key: fresh temporaries pay page faults each call (glibc returns big blocks to the OS)."""
    scratch = getattr(_THREAD, "scratch", None)
    if scratch is None:
        name = threading.current_thread().name
        scratch = _Scratch(name if name.startswith("gtx") else threading.get_ident())
        _THREAD.scratch = scratch
        with _SCRATCH["lock"]:
            _SCRATCH["all"].add(scratch)
    nbytes = n * np.dtype(dtype).itemsize
    buf = scratch.arrays.get(key)       # one lookup: release_buffers may clear them meanwhile
    if buf is None or buf.size < nbytes:
        buf = np.empty(nbytes, np.uint8)
        scratch.arrays[key] = buf
    return buf[:nbytes].view(dtype)


def release_buffers():
    """Frees the scratch arrays that gtx's threads and yours keep from call to call (up to a few
    times a call's own arrays), to give a long-lived process its memory back after large calls.
    Safe while another thread is inside gtx: what it is using lives on until it is done. On glibc,
    malloc_trim then returns the freed memory to the OS."""
    with _SCRATCH["lock"]:
        for scratch in list(_SCRATCH["all"]):
            scratch.arrays.clear()
    if platform.system() == "Linux":
        with contextlib.suppress(OSError, AttributeError):     # not glibc: nothing to trim
            ctypes.CDLL(None).malloc_trim(0)


def _held_bytes(prefix):
    """Bytes of the buffers this thread and gtx's threads hold that a dense or sparse call reuses
    (keys from prefix, do, dqkv): its memory check counts them as available, not as new."""
    mine = threading.get_ident()
    pool = f"gtx{nb.get_num_threads() - 1}_"
    with _SCRATCH["lock"]:
        held = [scratch for scratch in _SCRATCH["all"]
                if scratch.owner == mine or str(scratch.owner).startswith(pool)]
    return sum(b.size for scratch in held for key, b in list(scratch.arrays.items())
               if key.startswith(prefix) or key in ("do", "dqkv"))


_CGROUP = {"root": "/sys/fs/cgroup", "self": "/proc/self/cgroup"}    # tests point them elsewhere


def available_bytes():
    """Part 1's available_bytes, otherwise identical, except: also at most what each memory cgroup
    of this process, up to the root, leaves: its limit less its usage less the reclaimable page
    cache (v2: memory.max, memory.current, memory.stat's inactive_file; v1: memory.limit_in_bytes,
    memory.usage_in_bytes, total_inactive_file). Limits are read once; unlimited ones not again."""
    have = psutil.virtual_memory().available
    for limit, usage_file, stat_file, inactive in _cgroup_limits():
        try:
            with open(usage_file) as f:
                usage = int(f.read())
        except (OSError, ValueError):
            continue
        stat = {}
        with contextlib.suppress(OSError):
            with open(stat_file) as f:
                stat = dict(line.split() for line in f if line.count(" ") == 1)
        have = min(have, limit - usage + int(stat.get(inactive, 0)))
    return max(have, 0)


@functools.cache
def _cgroup_limits():
    """(limit, usage file, stat file, inactive key) of this process's memory cgroups and their
    parents that have a limit ("max", or v1's huge value, is none), v2 and v1."""
    try:
        with open(_CGROUP["self"]) as f:
            lines = [line.split(":", 2) for line in f.read().splitlines() if line.count(":") >= 2]
    except OSError:
        return []
    limits = []
    for _, controllers, path in lines:
        if controllers == "":
            base, files = _CGROUP["root"], ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base = os.path.join(_CGROUP["root"], "memory")
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts), -1, -1):
            folder = os.path.join(base, *parts[:depth])
            try:
                with open(os.path.join(folder, files[0])) as f:
                    limit = f.read().strip()
            except OSError:
                continue
            if limit.isdigit() and int(limit) < 2**60:
                limits.append((int(limit), os.path.join(folder, files[1]),
                               os.path.join(folder, "memory.stat"), files[2]))
    return limits


class _Stopped(Exception):
    """Raised at a _stop_point of a gtx thread whose call has failed in another thread."""


def _stop_point():                      # between units of work: stop if the call has failed
    stop = getattr(_THREAD, "stop", None)
    if stop is not None and stop.is_set():
        raise _Stopped


def _map_threads(fn, items):
    """list(map(fn, items)) on Numba's count of threads, this one too, a run of items each (not a
    task each: one costs tens of microseconds to hand to a thread), with denormals as zero. The
    first exception raised in any thread (Ctrl-C's KeyboardInterrupt in this one) stops the others
    at their next item or _stop_point, and is raised here, as itself, once all have stopped."""
    items = list(items)
    n = min(nb.get_num_threads(), len(items))
    runs = [items[c * len(items) // n:(c + 1) * len(items) // n] for c in range(n)]
    stop = threading.Event()
    raised = []                         # the exceptions, first first

    def each(run):                      # on x86: see _swap_mxcsr
        old = None
        if _NO_DENORMALS is not None:
            old = _mxcsr(_NO_DENORMALS)
        outer = getattr(_THREAD, "stop", None)
        _THREAD.stop = stop
        try:
            out = []
            for item in run:
                _stop_point()
                out.append(fn(item))
            return out
        except _Stopped:
            return []
        except BaseException as e:
            if isinstance(e, SystemError) and isinstance(e.__cause__, KeyboardInterrupt):
                e = e.__cause__         # Ctrl-C inside a Numba call: Numba reports it so
            raised.append(e)
            stop.set()
            raise e
        finally:
            _THREAD.stop = outer
            if old is not None:
                _mxcsr(np.uint32(old))
    futures = []
    try:
        for run in runs[1:]:            # inside the try: a Ctrl-C here waits for these too
            futures.append(_python_threads(n - 1).submit(each, run))
        mine = each(runs[0] if runs else [])
        for f in futures:
            f.exception()               # waits; a Ctrl-C here stops the call too
    except BaseException as e:
        stop.set()
        _wait_out(futures)
        if raised and raised[0] is not e:
            raise raised[0] from None
        raise
    if raised:
        raise raised[0]
    return mine + [r for f in futures for r in f.result()]


def _wait_out(futures):                 # every thread stopped, through a second Ctrl-C too
    for f in futures:
        while True:
            try:
                f.exception()
                break
            except KeyboardInterrupt:
                continue


def _packed(q, k, v):
    """(N, 3, H, dh) with q, k, v at [:, 0], [:, 1], [:, 2]: a view when they already lie so in
    memory, each node's q, k, v one after another (as _project makes them), else a copy."""
    N, H, dh = q.shape
    row = q.itemsize * H * dh                                           # bytes of one (H, dh)
    if (q.dtype == k.dtype == v.dtype and q.strides == k.strides == v.strides
            == (3 * row, q.itemsize * dh, q.itemsize)
            and k.ctypes.data - q.ctypes.data == v.ctypes.data - k.ctypes.data == row):
        return np.lib.stride_tricks.as_strided(q, (N, 3, H, dh), (3 * row, row, *q.strides[1:]))
    return np.stack((q, k, v), 1)


_MOST_THREADS = nb.config.NUMBA_NUM_THREADS     # set_num_threads may lower the count, not raise it
Product = namedtuple("Product", "a b out add", defaults=[None, None])  # a @ b (+ add) into out


def _matmuls(*products, min_work=2**22):
    """[a @ b (+ add, an (n,) row) for each Product], at once on Python threads: each (M, n) result
    cut along its longer side, each element one BLAS call's sum. The cuts follow the most threads
    gtx may have, not the count set now: where a row starts in its call changes its bits in
    OpenBLAS (Haswell kernels, EPYC), so the same cuts give the same bits for any thread count.
    A cut has min_work multiply-adds or more: 2^22 take ~90 us on a thread, a handoff ~50 us."""
    outs, blocks = [], []
    for a, b, out, add in products:
        M, K = a.shape
        n = b.shape[1]
        outs.append(np.empty((M, n), np.result_type(a, b)) if out is None else out.reshape(M, n))
        k = max(1, min(_MOST_THREADS // len(products), M * K * n // min_work))
        for c in (slice(c * max(M, n) // k, (c + 1) * max(M, n) // k) for c in range(k)):
            blocks.append((a, b, outs[-1], add, (c, slice(None)) if M >= n else (slice(None), c)))

    def block(task):
        a, b, out, add, cut = task
        np.matmul(a[cut[0]], b[:, cut[1]], out=out[cut])
        if add is not None:
            out[cut] += add[cut[1]]
    _map_threads(block, blocks)
    return outs
