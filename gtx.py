"""gtx: a Transformer is a graph neural network on a complete graph.

One multi-head scaled-dot-product graph attention layer, forward and hand-written backward,
in three backends that agree to round-off: naive (per-edge Python loops, the executable spec),
sparse (Numba CSR kernels) and dense (masked NumPy matmuls).

Edge e carries a message from source j = edge_index[0, e] to target i = edge_index[1, e]:
    q, k, v = x Wq + bq, x Wk + bk, x Wv + bv                       # (N, H, dh) each
    s[e, h] = <q[i_e, h], k[j_e, h]> / sqrt(dh) (+ edge_bias[e, h])  # (E, H)
    alpha[e, h] = softmax of s[., h] over the edges that share the target i_e
    o[i, h] = sum over edges e into i of alpha[e, h] v[j_e, h]      # (N, H, dh); 0 if i has no in-edges
    y = o Wo + bo                                                   # (N, D)
On complete_graph(n, self_loops=True) this is exactly softmax(Q K^T / sqrt(dh)) V per head.

    g = Graph(edge_index, num_nodes); params = init_params(D, H)
    y, cache = forward(x, g, params, backend="dense"); dx, grads = backward(dy, cache)
"""
# Dimension letters: N nodes, E edges, H heads, dh head size, D model width.
import contextlib
import math
import os
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from functools import cache, cached_property

# Numba's OpenMP threads (its default omp layer) keep spinning after each kernel, on the cores where
# the Python threads of _split_matmul run next; passive waiting puts them to sleep at once. libgomp
# reads this when Numba first loads it, at the first kernel call; a value set before then (yours
# included) wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic
from threadpoolctl import ThreadpoolController

BACKENDS = ("naive", "sparse", "dense")
PARAM_KEYS = ("Wq", "Wk", "Wv", "bq", "bk", "bv", "Wo", "bo")
FLOATS = (np.float32, np.float64)


# ---------------------------------------------------------------- graph

class Graph:
    """A directed graph whose edge e carries a message j = edge_index[0, e] -> i = edge_index[1, e].

    Validates once and keeps what the backends need: CSR by target for the forward, CSR by source
    (the transpose) for the key and value gradients, and, built on first use, the dense mask.
    """

    def __init__(self, edge_index, num_nodes):
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, (int, np.integer)):
            raise TypeError(f"num_nodes must be an int, got {type(num_nodes).__name__}")
        if num_nodes < 0:
            raise ValueError(f"num_nodes must be >= 0, got {num_nodes}")
        ei = np.asarray(edge_index)
        if ei.ndim != 2 or ei.shape[0] != 2:
            raise ValueError(f"edge_index must have shape (2, E), got {ei.shape}")
        if ei.size and (ei.dtype == bool or not np.issubdtype(ei.dtype, np.integer)):
            raise ValueError(f"edge_index must hold integers, got dtype {ei.dtype}")
        bad = np.flatnonzero(((ei < 0) | (ei >= num_nodes)).any(0))
        if bad.size:
            c = bad[0]
            raise ValueError(f"edge_index column {c} is ({ei[0, c]}, {ei[1, c]}): "
                             f"node indices must be in [0, num_nodes={num_nodes})")
        N, (src, dst) = int(num_nodes), ei.astype(np.int64)
        key = dst * N + src                                         # (E,) one integer per (j, i) pair
        order = np.argsort(key, kind="stable")                      # (E,) edges sorted by (target, source)
        dup = order[1:][key[order[1:]] == key[order[:-1]]]          # repeats, as input columns
        if dup.size:
            c = dup.min()
            raise ValueError(f"edge_index has a duplicate edge (j, i) = ({src[c]}, {dst[c]}) at column {c}")
        self.num_nodes, self.num_edges = N, src.size
        self.edge_index = np.stack([src, dst])                      # (2, E) in input order
        self.edge_index.flags.writeable = False
        self.is_complete = self.num_edges == N * N                  # every pair, self-loops included
        # CSR by target: the in-edges of i sit at positions indptr[i]:indptr[i+1]
        self.perm = order                                           # (E,) CSR position -> input edge id
        self.src = src[order]                                       # (E,) source of each CSR edge
        self.indptr = _indptr(dst, N)                               # (N+1,)
        # CSR by source (the transpose): out-edges of j, as positions into the target CSR
        self.t_pos = np.argsort(self.src, kind="stable")            # (E,)
        self.t_dst = dst[order][self.t_pos]                         # (E,) target of each transposed edge
        self.t_indptr = _indptr(src, N)                             # (N+1,)
        self.chunks, self.t_chunks = _balanced_chunks(self.indptr), _balanced_chunks(self.t_indptr)

    def __repr__(self):
        return f"Graph(num_nodes={self.num_nodes}, num_edges={self.num_edges})"

    @cached_property
    def dense_mask(self):
        """(N, N) float32: +inf at [i, j] for an edge j -> i, -inf elsewhere. Built once, for the dense
        backend: np.fmin(s, dense_mask) selects -inf at non-edges, and fmin ignores NaN, so a NaN score
        cannot survive at a non-edge. One branch-free pass, unlike a boolean where= (up to 15x slower)."""
        m = np.full((self.num_nodes, self.num_nodes), -np.inf, np.float32)
        m[self.edge_index[1], self.edge_index[0]] = np.inf
        return m


def _indptr(node_of_edge, N):
    """(N+1,) CSR offsets: the edges of node n sit at [indptr[n], indptr[n+1]) once sorted by node."""
    return np.concatenate([[0], np.cumsum(np.bincount(node_of_edge, minlength=N))])


def _balanced_chunks(indptr, n_chunks=64):
    """(<= n_chunks+1,) bounds of node ranges of about equal work (edges + nodes), so that many hubs
    spread over the threads. A node is never split: one hub with most of the edges stays on one thread."""
    work = indptr + np.arange(indptr.size)                          # (N+1,) strictly increasing
    return np.unique(np.searchsorted(work, np.linspace(0, work[-1], n_chunks + 1)))


def complete_graph(n, self_loops=True):
    """All n^2 edges j -> i (n^2 - n without self-loops): the graph a Transformer encoder attends over."""
    dst, src = np.divmod(np.arange(n * n), n)
    keep = slice(None) if self_loops else src != dst
    return Graph(np.stack([src[keep], dst[keep]]), n)


def causal_graph(n):
    """Edges j -> i for all j <= i: the graph a decoder (GPT) attends over."""
    dst, src = np.tril_indices(n)
    return Graph(np.stack([src, dst]), n)


def random_graph(n, avg_degree=None, density=None, rng=None):
    """Uniform random directed graph, no self-loops or duplicates, edges in random order.
    Give avg_degree (E = round(avg_degree n)) or density (E = round(density n^2)), not both."""
    if (avg_degree is None) == (density is None):
        raise ValueError("random_graph: give exactly one of avg_degree or density")
    E = round(avg_degree * n) if density is None else round(density * n * n)
    if not 0 <= E <= n * (n - 1):
        raise ValueError(f"random_graph: {E} edges do not fit in {n} nodes without self-loops "
                         f"(at most n(n-1) = {n * (n - 1)})")
    key = np.random.default_rng(rng).choice(n * (n - 1), size=E, replace=False)  # distinct off-diagonal slots
    dst, src = np.divmod(key, max(n - 1, 1))
    return Graph(np.stack([src + (src >= dst), dst]), n)            # shift past the diagonal: no self-loops


def sinusoidal_pe(n, d):
    """(n, d) encodings of Vaswani et al. (2017): PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)."""
    angle = np.arange(n)[:, None] / 10000 ** (np.arange(0, d, 2) / d)   # (n, ceil(d/2))
    pe = np.empty((n, d))
    pe[:, 0::2], pe[:, 1::2] = np.sin(angle), np.cos(angle[:, : d // 2])
    return pe


def laplacian_pe(g, k, rng=None):
    """(N, k) Laplacian eigenvector encodings (Dwivedi & Bresson 2020).

    Eigenvectors of L = I - D^-1/2 A D^-1/2 on the undirected version of g, self-loops ignored, in
    ascending eigenvalue order with the first one (eigenvalue 0 if g has an edge) dropped. An isolated
    node has D^-1/2 = 0, so its row of L is the identity's: its indicator is an eigenvector, eigenvalue 1.
    Sign: each column's entry of largest magnitude is positive (the first one on ties); with an rng,
    column signs are then flipped at random, as in training. Columns beyond the N - 1 the graph has are zero.
    """
    if not isinstance(g, Graph):
        raise TypeError(f"g must be a Graph, got {type(g).__name__}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    N, (src, dst) = g.num_nodes, g.edge_index
    A = np.zeros((N, N))                                            # (N, N) symmetric adjacency
    A[dst, src] = A[src, dst] = 1
    np.fill_diagonal(A, 0)
    deg = A.sum(1)
    d = np.divide(1, np.sqrt(deg), out=np.zeros(N), where=deg > 0)  # (N,) D^-1/2, 0 for isolated nodes
    _, U = np.linalg.eigh(np.eye(N) - d[:, None] * A * d[None, :])  # ascending eigenvalues
    U = U[:, 1:k + 1]                                               # (N, min(k, N-1))
    if U.size:
        U = U * np.sign(U[np.abs(U).argmax(0), np.arange(U.shape[1])])
    if rng is not None:
        U = U * np.random.default_rng(rng).choice([-1.0, 1.0], U.shape[1])
    return np.pad(U, ((0, 0), (0, k - U.shape[1])))


# ---------------------------------------------------------------- parameters

def init_params(d_model, n_heads, d_head=None, rng=None, dtype=np.float64):
    """Wq, Wk, Wv (D, H, dh); bq, bk, bv (H, dh); Wo (H, dh, D); bo (D,). Zero biases and Glorot-uniform
    weights: as torch.nn.MultiheadAttention, over the stacked (D, 3 H dh) in-projection for Wq, Wk, Wv;
    over (H dh, D) for Wo (torch leaves its out_proj at nn.Linear's default, U(+-1/sqrt(H dh)))."""
    is_count = lambda n: isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1
    if not (is_count(d_model) and is_count(n_heads) and (d_head is None or is_count(d_head))):
        raise ValueError(f"init_params: d_model, n_heads and d_head must be ints >= 1, got {d_model!r}, "
                         f"{n_heads!r}, {d_head!r}")
    dh = d_model // n_heads if d_head is None else d_head
    if dh < 1:
        raise ValueError(f"init_params: d_model // n_heads = {d_model} // {n_heads} is 0; give d_head")
    if np.dtype(dtype) not in FLOATS:
        raise ValueError(f"init_params: dtype must be float32 or float64, got {np.dtype(dtype)}")
    D, H, rng = d_model, n_heads, np.random.default_rng(rng)
    W = lambda bound, *shape: rng.uniform(-bound, bound, shape).astype(dtype)
    qkv, out = math.sqrt(6 / (D + 3 * H * dh)), math.sqrt(6 / (H * dh + D))   # sqrt(6 / (fan_in + fan_out))
    return dict(Wq=W(qkv, D, H, dh), Wk=W(qkv, D, H, dh), Wv=W(qkv, D, H, dh), Wo=W(out, H, dh, D),
                bq=np.zeros((H, dh), dtype), bk=np.zeros((H, dh), dtype), bv=np.zeros((H, dh), dtype),
                bo=np.zeros(D, dtype))


def _w_qkv(p):
    """[Wq Wk Wv] as one (D, 3*H*dh) matrix: a copy per call, D*3*H*dh floats, against N*D*3*H*dh
    multiply-adds in the matmul it feeds."""
    D, H, dh = p["Wq"].shape
    return np.stack([p["Wq"], p["Wk"], p["Wv"]], 1).reshape(D, 3 * H * dh)   # (D, 3*H*dh)


def _project(x, p, matmul=np.matmul):
    """q, k, v = x Wq + bq, x Wk + bk, x Wv + bv as one matmul, into qkv (N, 3, H, dh): one array,
    so that a node's k and v sit side by side for the sparse kernels' gathers."""
    D, H, dh = p["Wq"].shape
    qkv = matmul(x, _w_qkv(p))                                      # (N, 3*H*dh)
    qkv += np.stack([p["bq"], p["bk"], p["bv"]]).reshape(-1)        # in place: no second (N, 3*H*dh) array
    return qkv.reshape(-1, 3, H, dh)


def _project_backward(dqkv, x, p, grads, matmul=np.matmul):
    """Differentiates _project; writes dW*, db* into grads and returns dx (N, D)."""
    N, _, H, dh = dqkv.shape
    d = dqkv.reshape(N, 3 * H * dh)                                 # (N, 3*H*dh)
    dW = matmul(x.T, d).reshape(-1, 3, H, dh)                       # (D, 3, H, dh)
    db = d.sum(0).reshape(3, H, dh)                                 # (3, H, dh)
    for n, c in enumerate("qkv"):
        grads["W" + c], grads["b" + c] = dW[:, n].copy(), db[n].copy()
    return matmul(d, _w_qkv(p).T)                                   # (N, D)


# ---------------------------------------------------------------- naive
# Every backend implements the attention core between the shared projections: forward
# (qkv, bias, g) -> (o, cache) and backward (do, cache) -> (dqkv, ds), where qkv (N, 3, H, dh) holds
# q, k, v, and ds = dL/ds is also the edge bias's gradient, in input edge order (sparse and dense
# return None without a bias).

def naive_forward(qkv, bias, g):
    """Per-edge loops that read like the math; vectorised over heads and dh, never over edges."""
    (q, k, v), (src, dst) = qkv.transpose(1, 0, 2, 3), g.edge_index  # (N, H, dh) views each
    N, H, dh = q.shape
    s = np.empty((g.num_edges, H), q.dtype)                         # (E, H)
    for e, (j, i) in enumerate(zip(src, dst)):
        s[e] = (q[i] * k[j]).sum(-1) / math.sqrt(dh) + (0 if bias is None else bias[e])
    m = np.full((N, H), -np.inf, q.dtype)                           # (N, H) per-target max, subtracted for stability
    for e, i in enumerate(dst):
        m[i] = np.maximum(m[i], s[e])
    m[m == -np.inf] = 0                                             # every score -inf (a masking bias): weights 0
    ex, den = np.empty_like(s), np.zeros((N, H), q.dtype)           # (E, H), (N, H)
    for e, i in enumerate(dst):
        ex[e] = np.exp(s[e] - m[i])
        den[i] += ex[e]                                             # >= 1 unless every score of i is -inf
    alpha, o = np.empty_like(s), np.zeros_like(q)                   # (E, H), (N, H, dh)
    for e, (j, i) in enumerate(zip(src, dst)):
        alpha[e] = ex[e] / np.maximum(den[i], 1)                    # all -inf: 0 / 1, not 0 / 0
        o[i] += alpha[e][:, None] * v[j]
    return o, (qkv, alpha, g)


def naive_backward(do, cache):
    """The forward's loops in reverse, each under the forward line it differentiates."""
    qkv, alpha, g = cache
    (q, k, v), (src, dst) = qkv.transpose(1, 0, 2, 3), g.edge_index
    N, H, dh = q.shape
    dqkv = np.zeros_like(qkv)                                       # (N, 3, H, dh)
    dq, dk, dv = dqkv.transpose(1, 0, 2, 3)                         # (N, H, dh) views each
    dalpha, ds = np.empty_like(alpha), np.empty_like(alpha)         # (E, H)
    for e, (j, i) in enumerate(zip(src, dst)):                      # o[i] += alpha[e] * v[j]
        dalpha[e] = (do[i] * v[j]).sum(-1)
        dv[j] += alpha[e][:, None] * do[i]
    dot = np.zeros((N, H), q.dtype)                                 # (N, H) sum over in-edges of alpha dalpha
    for e, i in enumerate(dst):
        dot[i] += alpha[e] * dalpha[e]
    for e, i in enumerate(dst):                                     # alpha[e] = ex[e] / den[i]: softmax backward
        ds[e] = alpha[e] * (dalpha[e] - dot[i])
    for e, (j, i) in enumerate(zip(src, dst)):                      # s[e] = <q[i], k[j]> / sqrt(dh) + bias[e]
        dq[i] += ds[e][:, None] * k[j] / math.sqrt(dh)
        dk[j] += ds[e][:, None] * q[i] / math.sqrt(dh)
    return dqkv, ds


def naive_alpha(cache):
    return cache[1].copy()                                          # (E, H), already in input order


# ---------------------------------------------------------------- sparse
# Numba kernels over the target CSR. prange runs over chunks of targets, which are independent;
# the key and value gradients land on sources, so a second pass over the transposed CSR produces
# them instead of racing. Each node is summed by one thread in a fixed order: results are
# bit-identical for any thread count. Sums run in the input dtype and may be reassociated and fused
# (multiply-add), so that LLVM vectorises the dh loops; no other fast-math flag is set, so inf and
# NaN keep their meaning.
# The kernels gather rows at random (k_j, v_j of each source; q_i, do_i of each target), which the
# CPU cannot predict: each asks for the rows of the edge _AHEAD positions on, so that they arrive
# in cache while the current edge is computed (measured here: 13-25% off each kernel).
_REASSOC = {"reassoc", "contract"}
_AHEAD, _LINE = 8, 64                                               # edges ahead; bytes in a cache line


@intrinsic
def _prefetch(typingctx, a, i, offset):
    """Starts loading the cache line at byte `offset` of row a[i] (LLVM's prefetch). A hint only:
    it changes no result."""
    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        index = [args[1]] + [context.get_constant(nb.types.intp, 0)] * (sig.args[0].ndim - 1)
        row = cgutils.get_item_pointer(context, builder, sig.args[0], arr, index)
        byte = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [byte] + [ir.IntType(32)] * 3), "llvm.prefetch.p0i8")
        builder.call(fn, [builder.gep(builder.bitcast(row, byte), [args[2]])]   # read, keep in all caches, data
                     + [ir.Constant(ir.IntType(32), c) for c in (0, 3, 1)])
        return context.get_dummy_value()
    return nb.types.void(a, i, offset), codegen


@nb.njit(inline="always")
def _prefetch_bytes(a, i, start, stop):
    for b in range(start, stop, _LINE):                             # bytes start:stop of row a[i]
        _prefetch(a, i, b)
    _prefetch(a, i, stop - 1)                                       # the last line, when rows are not line-aligned


@nb.njit(parallel=True, cache=True, fastmath=_REASSOC)
def _sparse_forward_kernel(qkv, bias, indptr, src, chunks):
    N, _, H, dh = qkv.shape
    scale = qkv.dtype.type(1 / np.sqrt(dh))
    alpha, o = np.empty((src.size, H), qkv.dtype), np.empty((N, H, dh), qkv.dtype)   # (E, H) in CSR order, (N, H, dh)
    for c in nb.prange(chunks.size - 1):
        m, den = np.empty(H, qkv.dtype), np.empty(H, qkv.dtype)     # (H,) per-target max and softmax sum
        acc = np.empty((H, dh), qkv.dtype)                          # (H, dh) o_i, unnormalised
        for i in range(chunks[c], chunks[c + 1]):
            m[:] = -np.inf
            den[:] = 0
            acc[:] = 0
            for e in range(indptr[i], indptr[i + 1]):               # alpha holds s, then exp(s - max), then alpha
                if e + _AHEAD < src.size:                           # k and v of a source soon needed
                    _prefetch_bytes(qkv, src[e + _AHEAD], qkv[0, 0].nbytes, qkv[0].nbytes)
                j = src[e]                                          # s = <q_i, k_j> / sqrt(dh) + bias
                for h in range(H):
                    s = qkv.dtype.type(0)
                    for d in range(dh):
                        s += qkv[i, 0, h, d] * qkv[j, 1, h, d]
                    s = s * scale + (0 if bias is None else bias[e, h])
                    alpha[e, h] = s
                    m[h] = max(m[h], s)
            for h in range(H):
                if m[h] == -np.inf:                                 # every score -inf (a masking bias): weights 0
                    m[h] = 0
            for e in range(indptr[i], indptr[i + 1]):               # exp(s - max), max subtracted for stability
                j = src[e]
                for h in range(H):
                    p = np.exp(alpha[e, h] - m[h])
                    alpha[e, h] = p
                    den[h] += p
                    for d in range(dh):
                        acc[h, d] += p * qkv[j, 2, h, d]
            for h in range(H):                                      # normalise once; no in-edges: o_i = 0 / 1
                den[h] = max(den[h], 1)                             # den >= 1 unless every score is -inf
                for e in range(indptr[i], indptr[i + 1]):
                    alpha[e, h] /= den[h]
                for d in range(dh):
                    o[i, h, d] = acc[h, d] / den[h]
    return o, alpha


def sparse_forward(qkv, bias, g):
    csr_bias = None if bias is None else bias[g.perm]               # (E, H) input order -> CSR order
    o, alpha = _sparse_forward_kernel(qkv, csr_bias, g.indptr, g.src, g.chunks)
    return o, (qkv, o, alpha, g, bias is not None)                  # alpha (E, H) kept: the backward needs it


@nb.njit(parallel=True, cache=True, fastmath=_REASSOC)
def _sparse_backward_targets(do, qkv, o, alpha, dqkv, indptr, src, chunks):
    """ds (E, H) and dq into dqkv[:, 0]: every write lands on the target row i this thread owns."""
    N, _, H, dh = qkv.shape
    scale = qkv.dtype.type(1 / np.sqrt(dh))
    ds = np.empty_like(alpha)
    for c in nb.prange(chunks.size - 1):
        for i in range(chunks[c], chunks[c + 1]):
            for h in range(H):
                dot = qkv.dtype.type(0)                             # sum_e alpha_e dalpha_e = <do_i, o_i>
                for d in range(dh):
                    dot += do[i, h, d] * o[i, h, d]
                    dqkv[i, 0, h, d] = 0
                for e in range(indptr[i], indptr[i + 1]):
                    if h == 0 and e + _AHEAD < src.size:            # once per edge (h is the outer loop)
                        _prefetch_bytes(qkv, src[e + _AHEAD], qkv[0, 0].nbytes, qkv[0].nbytes)
                    j, da = src[e], qkv.dtype.type(0)               # o_i = sum_e alpha_e v_j: dalpha_e = <do_i, v_j>
                    for d in range(dh):
                        da += do[i, h, d] * qkv[j, 2, h, d]
                    ds[e, h] = alpha[e, h] * (da - dot)             # softmax backward
                    for d in range(dh):                             # s = <q_i, k_j> / sqrt(dh) + bias
                        dqkv[i, 0, h, d] += ds[e, h] * scale * qkv[j, 1, h, d]
    return ds


@nb.njit(parallel=True, cache=True, fastmath=_REASSOC)
def _sparse_backward_sources(do, qkv, alpha, ds, dqkv, t_indptr, t_pos, t_dst, t_chunks):
    """dk and dv into dqkv[:, 1:] by a pass over the transposed CSR: every write lands on the source row j."""
    N, _, H, dh = qkv.shape
    scale = qkv.dtype.type(1 / np.sqrt(dh))
    for c in nb.prange(t_chunks.size - 1):
        for j in range(t_chunks[c], t_chunks[c + 1]):
            dqkv[j, 1:] = 0
            for t in range(t_indptr[j], t_indptr[j + 1]):
                if t + _AHEAD < t_pos.size:                         # q, do, alpha and ds of an edge soon needed
                    i_next, e_next = t_dst[t + _AHEAD], t_pos[t + _AHEAD]
                    _prefetch_bytes(qkv, i_next, 0, qkv[0, 0].nbytes)
                    _prefetch_bytes(do, i_next, 0, do[0].nbytes)
                    _prefetch(alpha, e_next, 0)
                    _prefetch(ds, e_next, 0)
                e, i = t_pos[t], t_dst[t]                           # e: the edge's position in the target CSR
                for h in range(H):
                    dk_scale, dv_scale = ds[e, h] * scale, alpha[e, h]
                    for d in range(dh):
                        dqkv[j, 1, h, d] += dk_scale * qkv[i, 0, h, d]
                        dqkv[j, 2, h, d] += dv_scale * do[i, h, d]


def sparse_backward(do, cache):
    qkv, o, alpha, g, has_bias = cache
    dqkv = np.empty_like(qkv)                                       # (N, 3, H, dh)
    ds = _sparse_backward_targets(do, qkv, o, alpha, dqkv, g.indptr, g.src, g.chunks)
    _sparse_backward_sources(do, qkv, alpha, ds, dqkv, g.t_indptr, g.t_pos, g.t_dst, g.t_chunks)
    return dqkv, (_input_order(ds, g) if has_bias else None)


def sparse_alpha(cache):
    return _input_order(cache[2], cache[3])


def _input_order(a, g):
    """(E, H) from CSR order back to the graph's input edge order."""
    out = np.empty_like(a)
    out[g.perm] = a
    return out


# ---------------------------------------------------------------- dense
# Per head: S = Q K^T / sqrt(dh) as one matmul, non-edges set to -inf by selection (never by
# multiplying with 0, so a NaN at node j cannot reach a row that does not attend to j), softmax,
# then P V. Heads run one at a time, so besides ex (H, N, N), kept for the backward, the work
# needs one N x N scratch matrix. The probabilities are kept unnormalised, ex = exp(S - max)
# with row sums den: the normalisation is applied to the (N, dh) side instead of dividing an
# N x N matrix.

def dense_bytes(g, n_heads, dtype, edge_bias=False):
    """Bytes the dense backend needs beyond its (N, H, dh) arrays, for forward plus backward: ex
    (H, N, N), kept for the backward, one (N, N) scratch matrix, the (N, N) float32 mask unless g is
    complete, and with an edge bias its (E, H) gradient and the (E,) gathers of each head."""
    n2, E, item = g.num_nodes ** 2, g.num_edges, np.dtype(dtype).itemsize
    return ((n_heads + 1) * n2 * item + (0 if g.is_complete else 4 * n2)
            + (E * (n_heads + 2) * item + 2 * E * 8 if edge_bias else 0))


def available_bytes():
    """Memory the OS can hand out now: MemAvailable on Linux, else free (or, on macOS, total) physical
    memory; where none of these can be read (Windows), infinity, which turns the dense guard off."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
            try:
                return os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages)
            except (AttributeError, ValueError, OSError):
                pass
        return math.inf


def dense_forward(qkv, bias, g):
    q, k, v = qkv.transpose(1, 0, 2, 3)                             # (N, H, dh) views each
    N, H, dh = q.shape
    need, have = dense_bytes(g, H, q.dtype, bias is not None), available_bytes()
    if need > have:
        raise MemoryError(f"dense backend needs about {need / 2**30:.1f} GiB for its N x N work (N={N}, H={H}), "
                          f"but {have / 2**30:.1f} GiB is available; use backend='sparse'")
    mask = None if g.is_complete else g.dense_mask                  # (N, N) or None: a complete graph needs no mask
    src, dst = g.edge_index
    qs = q / math.sqrt(dh)                                          # (N, H, dh) scale folded into q: N*dh work, not N^2
    ex = np.empty((H, N, N), q.dtype)                               # (H, N, N) kept for the backward on purpose
    o = np.empty_like(q)                                            # (N, H, dh)
    den = np.empty((N, H), q.dtype)                                 # (N, H) softmax row sums
    for h in range(H):
        s = ex[h]                                                   # (N, N) s[i, j], overwritten in place
        np.matmul(qs[:, h], k[:, h].T, out=s)
        if bias is not None:
            s[dst, src] += bias[:, h]
        if mask is not None:
            np.fmin(s, mask, out=s)                                 # non-edges -> -inf, by selection
        m = s.max(1, initial=-np.inf)                               # (N,) row max, subtracted for stability
        m[m == -np.inf] = 0                                         # no edges (or all scores -inf): exp gives 0
        s -= m[:, None]
        np.exp(s, out=s)
        den[:, h] = s.sum(1)
        o[:, h] = _masked_matmul(s, v[:, h], mask)
    np.maximum(den, 1, out=den)                                     # >= 1 unless a row is empty or all -inf: 0 / 1
    o /= den[..., None]
    return o, (qs, k, v, o, ex, den, g, bias is not None)


def _masked_matmul(p, v, mask):
    """p @ v, except that a non-finite v_j reaches only the rows i with an edge j -> i, as in the loops."""
    bad = ~np.isfinite(v).all(1)                                    # (N,) sources whose v is inf or NaN
    if mask is None or not bad.any():
        return p @ v
    out = p @ np.where(bad[:, None], 0, v)
    hit = (mask[:, bad] > 0).any(1)                                 # rows that do attend to a bad source
    out[hit] = p[hit] @ v
    return out


def dense_backward(do, cache):
    qs, k, v, o, ex, den, g, has_bias = cache
    N, H, dh = qs.shape
    src, dst = g.edge_index
    ks = k / math.sqrt(dh)                                          # (N, H, dh)
    dqkv = np.empty((N, 3, H, dh), qs.dtype)                        # (N, 3, H, dh)
    dq, dk, dv = dqkv.transpose(1, 0, 2, 3)                         # (N, H, dh) views each
    ds_edges = np.empty((g.num_edges, H), qs.dtype) if has_bias else None   # (E, H)
    do_n = do / den[..., None]                                      # (N, H, dh) dO / den: P = ex / den never formed
    dot = (do_n * o).sum(-1)                                        # (N, H) sum_j P_ij dP_ij / den_i = <dO_i, o_i> / den_i
    ds = np.empty((N, N), qs.dtype)                                 # (N, N) scratch, reused by every head
    for h in range(H):
        dv[:, h] = ex[h].T @ do_n[:, h]                             # o = P v
        np.matmul(do_n[:, h], v[:, h].T, out=ds)                    # dP / den
        ds -= dot[:, h, None]
        ds *= ex[h]                                                 # softmax backward: dS = P * (dP - <dO, o>)
        if has_bias:
            ds_edges[:, h] = ds[dst, src]
        dq[:, h] = ds @ ks[:, h]                                    # S = Q K^T / sqrt(dh)
        dk[:, h] = ds.T @ qs[:, h]
    return dqkv, ds_edges


def dense_alpha(cache):
    ex, den, g = cache[4], cache[5], cache[6]
    src, dst = g.edge_index
    return ex[:, dst, src].T / den[dst]                             # (E, H)


# ---------------------------------------------------------------- API

_BACKENDS = {"naive": (naive_forward, naive_backward, naive_alpha),
             "sparse": (sparse_forward, sparse_backward, sparse_alpha),
             "dense": (dense_forward, dense_backward, dense_alpha)}
Cache = namedtuple("Cache", "backend x params o attention has_bias")
_THREADPOOLS = ThreadpoolController()


@contextlib.contextmanager
def _matmul_around(backend):
    """The matmul for the projections around a backend. Around sparse, BLAS keeps to one thread and
    Python threads, as many as Numba's, split the products instead: idle OpenBLAS workers spin for
    about 0.1 s after each call and take the cores that the kernels need next (measured here: the
    sparse forward took 24 ms right after a 2-thread matmul and 12.7 ms without one), while idle
    Python threads sleep."""
    if backend != "sparse":
        yield np.matmul
        return
    with _THREADPOOLS.limit(limits=1, user_api="blas"):
        yield _split_matmul


@cache
def _python_threads(n):
    return ThreadPoolExecutor(n)


if hasattr(os, "register_at_fork"):                                # POSIX only
    os.register_at_fork(after_in_child=_python_threads.cache_clear)  # a forked child has none of the threads


def _split_matmul(a, b, max_blocks=4, min_work=2**23):
    """a @ b by blocks, on as many Python threads as Numba has. The longer of a's rows (M) and the
    summed dimension (K) is cut into up to max_blocks blocks of at least min_work multiply-adds (fewer
    would cost more in hand-offs than they save), a number fixed by the shapes alone, so the result
    does not depend on the thread count. Blocks of rows fill their rows of the output; blocks of the
    sum (a.T @ dy, a weight gradient summed over N) give products that are added in order."""
    (M, K), n = a.shape, nb.get_num_threads()
    L, blocks = max(M, K), max(1, min(max_blocks, M * K * b.shape[1] // min_work))
    cuts = [slice(c * L // blocks, (c + 1) * L // blocks) for c in range(blocks)]
    run = _python_threads(n).map if n > 1 and blocks > 1 else map
    if M < K:
        return sum(run(lambda part: a[:, part] @ b[part], cuts))
    out = np.empty((M, b.shape[1]), np.result_type(a, b))          # (M, b's columns)
    for _ in run(lambda rows: np.matmul(a[rows], b, out=out[rows]), cuts):
        pass                                                        # each block writes its rows of out
    return out


def _as_float_array(name, a, dtype=None, shape=None):
    a = np.asarray(a)
    if a.dtype not in FLOATS:
        raise ValueError(f"{name} must be float32 or float64, got dtype {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{name} has dtype {a.dtype} but x has {dtype}: all arrays must share one float dtype")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    return a


def _check_params(params, D, dtype):
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    missing = [key for key in PARAM_KEYS if key not in params]
    if missing:
        raise ValueError(f"params is missing {missing}")
    Wq = np.asarray(params["Wq"])
    if Wq.ndim != 3 or Wq.shape[0] != D:
        raise ValueError(f"x has D={D} features but params['Wq'] has shape {Wq.shape}: Wq must be (D, H, dh)")
    _, H, dh = Wq.shape
    shapes = dict(Wq=(D, H, dh), Wk=(D, H, dh), Wv=(D, H, dh), bq=(H, dh), bk=(H, dh), bv=(H, dh),
                  Wo=(H, dh, D), bo=(D,))
    return {key: _as_float_array(f"params['{key}']", params[key], dtype, shape) for key, shape in shapes.items()}


def forward(x, g, params, backend="dense", edge_bias=None):
    """y (N, D) and a cache for backward. edge_bias (E, H), in g's input edge order, is added to the scores."""
    if not isinstance(g, Graph):
        raise TypeError(f"g must be a Graph, got {type(g).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends are {', '.join(BACKENDS)}")
    x = _as_float_array("x", x)
    if x.ndim != 2 or x.shape[0] != g.num_nodes:
        raise ValueError(f"x must have shape (num_nodes={g.num_nodes}, D), got {x.shape}")
    p = _check_params(params, x.shape[1], x.dtype)
    if edge_bias is not None:
        edge_bias = _as_float_array("edge_bias", edge_bias, x.dtype, (g.num_edges, p["Wq"].shape[1]))
    N, (H, dh, D) = len(x), p["Wo"].shape
    with _matmul_around(backend) as matmul:
        qkv = _project(x, p, matmul)                                # (N, 3, H, dh)
        o, attention = _BACKENDS[backend][0](qkv, edge_bias, g)     # (N, H, dh)
        y = matmul(o.reshape(N, H * dh), p["Wo"].reshape(H * dh, D))   # (N, D) y = o Wo + bo
        y += p["bo"]
    return y, Cache(backend, x, p, o, attention, edge_bias is not None)


def _check_cache(cache):
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be the second value forward returned, got {type(cache).__name__}")


def backward(dy, cache):
    """dx (N, D) and grads, a dict with the keys of params (plus "edge_bias" if forward had one).
    The cache holds x and params by reference, as cs231n's layers do: change them in place only after."""
    _check_cache(cache)
    backend, x, p, o, attention, has_bias = cache
    dy = _as_float_array("dy", dy, x.dtype, x.shape)
    N, (H, dh, D) = len(x), p["Wo"].shape
    with _matmul_around(backend) as matmul:
        grads = {"Wo": matmul(o.reshape(N, H * dh).T, dy).reshape(H, dh, D),   # y = o Wo + bo
                 "bo": dy.sum(0)}
        do = matmul(dy, p["Wo"].reshape(H * dh, D).T).reshape(N, H, dh)       # (N, H, dh)
        dqkv, ds = _BACKENDS[backend][1](do, attention)             # (N, 3, H, dh)
        if has_bias:
            grads["edge_bias"] = ds                                 # s = ... + edge_bias
        dx = _project_backward(dqkv, x, p, grads, matmul)
    return dx, grads


def attention_weights(cache):
    """alpha (E, H) in the graph's input edge order."""
    _check_cache(cache)
    return _BACKENDS[cache.backend][2](cache.attention)
