#!/usr/bin/env python3
"""The hardware lottery, measured: gtx's dense, sparse and naive backends on this machine.

A Transformer layer is graph attention on the complete graph. The dense backend computes blocks
of target rows with matmuls (BLAS, hundreds of GFLOP/s); the sparse backend does only the edges'
work, in per-edge Numba kernels that run far slower per FLOP. This script times both on
Transformer-like, structured and sparse graphs, finds the density where they cost the same, and
then measures what the graph buys in learning (positional encodings against the true edges), and
trains a small GPT, gtx's Transformer blocks on causal graphs, on Python's own documentation, and
sets a GNN against a Transformer with structural encodings on real molecules (RDKit).

    python bench.py                  # the default run: about 4 minutes on 2 cores
    python bench.py --quick          # a tiny version in seconds (the tests run it)
    python bench.py --only gpt       # one part: lottery, learn, gpt or molecules
    python bench.py --only molecules --full --seeds 3   # trained until validation stops improving
    python bench.py --make-zinc molsets-0.3.1-py3-none-any.whl   # rewrites data/zinc.csv
    python bench.py --dtype float64 --threads 1 --json out.json --plot out.png

Rows print as they are measured; progress goes to stderr. The plot goes to bench-latest.png
unless --plot says where (the README's figure is bench.png).
"""
# Dimension letters: N nodes, E edges, H heads, dh head size, D model width.
import argparse
import ctypes
import ctypes.util
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numba
import numpy as np
import psutil
from threadpoolctl import threadpool_info, threadpool_limits

import gtx

SEED, MiB = 0, 2**20
TOL = {"float32": 1e-4, "float64": 1e-10}   # worst max|a - b| / max|b| over y, dx and gradients
PROC = "/proc/self"                         # Linux only; every use has a portable fallback
START = time.perf_counter()


def config(quick):
    """Workloads (name, graph spec, D, H, dh) and budgets. The density sweep's 5% point is mid."""
    if quick:                                   # the same code paths on tiny shapes
        return dict(repeats=3, row_budget=2.0, naive_max_edges=5000, memory=("transformer",),
                    n=256, densities=(0.01, 0.05, 0.3, 1.0), sweep_dims=(32, 2, 16), learn="quick", gpt="quick",
                    molecules="quick",
                    workloads=[("small", ("random", 200, 8), 16, 2, 8),
                               ("transformer", ("complete", 128), 32, 2, 16),
                               ("sparse", ("random", 4000, 8), 16, 2, 8),
                               ("powerlaw", ("ba", 1000, 4), 16, 2, 8),
                               ("molecules", ("molecules", 50, 5, 12), 16, 2, 8),
                               ("window", ("window", 1024, 32), 32, 2, 16),
                               ("causal", ("causal", 256), 32, 2, 16),
                               ("long", ("complete", 512), 32, 2, 16)])
    return dict(repeats=5, row_budget=10.0, naive_max_edges=20_000, memory="all", n=2048,
                densities=(0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.3, 1.0), sweep_dims=(128, 4, 32),
                learn="default", gpt="default", molecules="default", workloads=[("small", ("random", 1000, 16), 64, 4, 16),
                                            ("transformer", ("complete", 1024), 256, 4, 64),
                                            ("sparse", ("random", 20000, 16), 64, 4, 16),
                                            ("powerlaw", ("ba", 10000, 8), 64, 4, 16),
                                            ("molecules", ("molecules", 1000, 15, 35), 64, 4, 16),
                                            ("window", ("window", 16384, 128), 256, 4, 64),
                                            ("causal", ("causal", 4096), 256, 4, 64),
                                            ("long", ("complete", 8192), 256, 4, 64)])


# ---------------------------------------------------------------- graphs and inputs

def barabasi_albert(n, m, rng):
    """Preferential attachment, edges both ways: each new node t links to m distinct earlier
    nodes drawn by degree, i.e. uniformly from the list of all edge endpoints so far."""
    rng, ends = np.random.default_rng(rng), list(range(m))
    src, dst = [], []
    for t in range(m, n):
        chosen = set()
        while len(chosen) < m:
            chosen.update(ends[i] for i in rng.integers(0, len(ends), m - len(chosen)))
        for j in sorted(chosen):
            src += [j, t]
            dst += [t, j]
            ends += [j, t]
    return gtx.Graph(np.array([src, dst]).reshape(2, -1), n)


def build_graph(spec):
    kind, *a = spec
    if kind == "complete":
        return gtx.complete_graph(a[0])
    if kind == "causal":
        return gtx.causal_graph(a[0])
    if kind == "window":
        return gtx.causal_graph(a[0], window=a[1])
    if kind == "molecules":                     # as PyG batches molecules: complete inside each graph
        sizes = np.random.default_rng(SEED).integers(a[1], a[2] + 1, size=a[0])
        return gtx.batch_graphs([gtx.complete_graph(int(n)) for n in sizes])
    if kind == "ba":
        return barabasi_albert(a[0], a[1], SEED)
    if kind == "density":
        return gtx.random_graph(a[0], density=a[1], rng=SEED)
    return gtx.random_graph(a[0], avg_degree=a[1], rng=SEED)


def make_inputs(g, D, H, dh, dtype):
    rng = np.random.default_rng(SEED)
    params = gtx.init_params(D, H, dh, rng=rng, dtype=dtype)
    x, dy = (rng.standard_normal((g.num_nodes, D)).astype(dtype) for _ in range(2))
    return x, params, dy


def run_once(backend, g, x, params, dy):
    y, cache = gtx.forward(x, g, params, backend=backend)
    dx, grads = gtx.backward(dy, cache)
    return dict(y=y, dx=dx, **grads), cache.backend


def warm_up(dtype):
    """First calls (Numba's compile or cache load, thread pools) on a tiny graph, untimed."""
    g = gtx.random_graph(64, avg_degree=4, rng=SEED)
    for b in (*gtx.BACKENDS, "auto"):
        run_once(b, g, *make_inputs(g, 16, 2, 8, dtype))


# ---------------------------------------------------------------- measuring

def progress(msg):
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def cpu_ticks():
    """Seconds of CPU time: all programs busy, all CPUs in total, this process (with its children).
    Linux counts a guest's time in user time too, so guest fields are left out of the total."""
    t, own = psutil.cpu_times(), psutil.Process().cpu_times()
    total = sum(t) - getattr(t, "guest", 0) - getattr(t, "guest_nice", 0)
    return total - t.idle - getattr(t, "iowait", 0), total, sum(own[:4])


def others_share(t0, t1):
    """Share of all CPU time between two cpu_ticks() that other programs took."""
    busy, total, own = (b - a for a, b in zip(t0, t1))
    return max(busy - own, 0) / total if total > 0 else 0.0


def time_runs(backend, g, x, params, dy, repeats):
    """Seconds of forward, backward and both, per run; one clock brackets a run's two calls."""
    runs, ticks = [], cpu_ticks()
    for _ in range(repeats):
        t0 = time.perf_counter()
        y, cache = gtx.forward(x, g, params, backend=backend)
        t1 = time.perf_counter()
        gtx.backward(dy, cache)
        runs.append((t1 - t0, time.perf_counter() - t1))
        del y, cache                            # freed before the next run: runs never overlap
    return dict(fwd=[f for f, _ in runs], bwd=[b for _, b in runs], total=[f + b for f, b in runs],
                others_cpu=others_share(ticks, cpu_ticks()))


def rel_err(out, ref):
    """Worst max|out - ref| / max|ref| over y, dx and the gradients. A bias gradient is scaled like
    its weight's: that of bk is 0 in exact arithmetic (softmax ignores a per-target shift)."""
    def scale(k):
        return max(np.abs(ref[k]).max(initial=0), np.abs(ref["W" + k[1]]).max() if k[0] == "b" else 0,
                   np.finfo(ref[k].dtype).tiny)
    return max(float(np.abs(out[k] - ref[k]).max(initial=0) / scale(k)) for k in ref)


def useful_flops(N, E, D, H, dh):
    """Forward plus backward: 12 matmuls of (N, D) x (D, H dh) size, and per edge and head 6 dot
    products or axpys of length dh (score, P V, and four in the backward), 2 FLOPs each."""
    return 24 * N * D * H * dh + 12 * E * H * dh


def measure_workload(name, spec, D, H, dh, cfg, dtype, print_row):
    """Times every backend that fits (naive on small graphs only) and auto; checks each against
    another backend's output; returns the workload's record."""
    t0 = time.perf_counter()
    g = build_graph(spec)
    rec = dict(name=name, graph=spec, D=D, H=H, dh=dh, N=g.num_nodes, E=g.num_edges,
               build_s=time.perf_counter() - t0, rows={},      # needs: gtx's memory estimates
               needs=dict(dense=gtx.dense_bytes(g, H, dh, dtype, d_model=D),
                          sparse=gtx.sparse_bytes(g, H, dh, dtype, d_model=D)))
    x, params, dy = make_inputs(g, D, H, dh, dtype)
    progress(f"{name}: N={g.num_nodes} E={g.num_edges} built in {rec['build_s']:.2f} s")
    outputs, estimate = {}, gtx.choose_backend(g, H, dh, dtype)[1]
    for b in ("naive", "dense", "sparse", "auto"):
        row = rec["rows"][b] = dict(backend=b)
        need = rec["needs"].get(b, 0)
        if b == "naive" and g.num_edges > cfg["naive_max_edges"]:
            row["skip"] = f"E > {cfg['naive_max_edges']:,} (a Python loop)"
        elif need > psutil.virtual_memory().available / 2:
            row["skip"] = f"needs {need / 2**30:.1f} GiB"
        elif estimate.get(b, 0) > cfg["row_budget"]:
            row["skip"] = f"~{estimate[b]:.0f} s a run (estimated); {need / 2**30:.1f} GiB"
        if "skip" in row:
            continue
        outputs[b], row["picked"] = run_once(b, g, x, params, dy)      # warm-up: first calls, checks
        first = time_runs(b, g, x, params, dy, 1)                       # runs that fit the budget
        runs = 1 if first["total"][0] * cfg["repeats"] > cfg["row_budget"] else cfg["repeats"]
        rest = time_runs(b, g, x, params, dy, runs - 1)
        row["times"] = dict({k: first[k] + rest[k] for k in ("fwd", "bwd", "total")},
                            others_cpu=max(first["others_cpu"], rest["others_cpu"]))
        progress(f"{name}: {b} {np.median(row['times']['total']) * 1e3:.1f} ms ({runs} runs)")
    for b, out in outputs.items():              # each against the first other backend that ran
        ref = next((r for r in ("naive", "sparse", "dense") if r in outputs and r != b
                    and r != rec["rows"][b]["picked"]), None)
        check = None
        if ref is not None:
            check = dict(ref=ref, err=rel_err(out, outputs[ref]))
        rec["rows"][b]["check"] = check
    for b in rec["rows"]:
        print_row(rec, b)
    return rec


def measure_peaked(rec, dtype, repeats, scale=8.0):
    """Dense on sharply peaked attention (Wq and Wk scaled, as a trained model's can be), as gtx
    runs it, with denormal floats counted as 0 in its threads (x86), and with that switched off:
    median seconds of each and their outputs' relative difference, or None where gtx does not flush."""
    flush = gtx._NO_DENORMALS
    if flush is None:
        return None
    g = build_graph(rec["graph"])
    x, params, dy = make_inputs(g, rec["D"], rec["H"], rec["dh"], dtype)
    params = dict(params, Wq=scale * params["Wq"], Wk=scale * params["Wk"])
    out, outputs = dict(scale=scale), {}
    for mode in ("flushed", "kept"):
        gtx._NO_DENORMALS = flush if mode == "flushed" else None
        try:
            outputs[mode] = run_once("dense", g, x, params, dy)[0]
            out[mode] = float(np.median(time_runs("dense", g, x, params, dy, repeats)["total"]))
        finally:
            gtx._NO_DENORMALS = flush
        progress(f"peaked: dense, denormals {mode}, {out[mode] * 1e3:.1f} ms")
    out["err"] = rel_err(outputs["flushed"], outputs["kept"])
    return out


def child_memory(task):
    """Fresh process: peak RSS growth over one forward plus backward, after a tiny warm-up."""
    dtype = np.dtype(task["dtype"]).type
    numba.set_num_threads(task["threads"])
    warm_up(dtype)
    g = build_graph(task["spec"])
    inputs = make_inputs(g, task["D"], task["H"], task["dh"], dtype)
    release_freed_memory()
    base, reset = psutil.Process().memory_info().rss, reset_peak()
    run_once(task["backend"], g, *inputs)
    peak = peak_rss()
    return dict(peak_bytes=max(peak - base, 0), exact=reset) if peak else dict(error="no peak RSS here")


def release_freed_memory():
    """Hands memory that malloc keeps back to the OS (glibc only), so that a later peak counts
    every page the run touches."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (AttributeError, OSError, TypeError):
        pass


def reset_peak():
    """Resets the peak RSS to the current RSS where the OS allows it (Linux); elsewhere the peak
    since the process started stands, which in a fresh process is little more than the inputs."""
    try:
        with open(f"{PROC}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss():
    """Peak resident bytes of this process: Linux's VmHWM, else ru_maxrss (macOS: bytes, other
    Unix: KiB), else Windows' peak working set; None where the OS says none of these."""
    try:
        with open(f"{PROC}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    except ImportError:
        return getattr(psutil.Process().memory_info(), "peak_wset", None)


def run_child(task, env=None):
    """Runs this script's --child mode in a fresh Python process; returns its JSON answer."""
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(task)],
                       capture_output=True, text=True, env=env)
    if p.returncode:
        return dict(error=(p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1])
    return json.loads(p.stdout.splitlines()[-1])


def child_compile(task):
    """Fresh process: the sparse backend's first call minus its second, on a tiny graph."""
    numba.set_num_threads(task["threads"])
    g = gtx.random_graph(64, avg_degree=4, rng=SEED)
    inputs, t = make_inputs(g, 16, 2, 8, np.dtype(task["dtype"]).type), [time.perf_counter()]
    for _ in range(2):
        run_once("sparse", g, *inputs)
        t.append(time.perf_counter())
    return dict(compile_s=(t[1] - t[0]) - (t[2] - t[1]))


def measure_compile(dtype, threads):
    """Numba compile cost, never inside a timing: a fresh process with an empty cache (cold), then
    another that finds the cache the first one wrote (warm)."""
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        return {k: run_child(dict(task="compile", dtype=dtype, threads=threads), env).get("compile_s")
                for k in ("cold", "warm")}


# ---------------------------------------------------------------- learning: what the graph buys
# Every node must predict the mean of its in-neighbours' features, on random graphs of 24-40 nodes
# with about 3 in-edges per node; the score is the held-out MSE over the target's variance. One gtx
# layer, trained with its own gradients and Adam, in five arms with the same width, heads, steps
# and data, which differ only in what they are told of the graph. The input is x then k PE
# columns (zero where an arm has none); the loss is on the first d_x output columns.
ARMS = ("graph", "complete", "complete+sinusoidal", "complete+laplacian", "complete+edge_bias")
LEARN = dict(test=dict(seeds=(0,), n_train=128, n_test=32, steps=200),
             quick=dict(seeds=(0, 1, 2), n_train=96, n_test=32, steps=150),
             default=dict(seeds=(0, 1, 2), n_train=256, n_test=64, steps=300))


def learn_graphs(count, rng, d_x=8):
    """(graph, x, target) triples: target_i = mean of x_j over the edges j -> i (0 without any)."""
    data = []
    for n in rng.integers(24, 41, count):
        g = gtx.random_graph(int(n), avg_degree=3, rng=rng)
        x, (src, dst) = rng.normal(size=(g.num_nodes, d_x)), g.edge_index
        t = np.zeros_like(x)
        np.add.at(t, dst, x[src])
        data.append((g, x, t / np.maximum(np.bincount(dst, minlength=g.num_nodes), 1)[:, None]))
    return data


def learn_batch(arm, data, k):
    """One block-diagonal batch: input z, target t, the graph attended over, the graphs' sizes
    and, for edge_bias, which edges of the complete graphs are the graphs' own edges."""
    graphs, xs, ts = zip(*data)
    pe = {"complete+sinusoidal": lambda g: gtx.sinusoidal_pe(g.num_nodes, k),
          "complete+laplacian": lambda g: gtx.laplacian_pe(g, k)}.get(arm, lambda g: np.zeros((g.num_nodes, k)))
    is_edge = None
    if arm == "complete+edge_bias":               # complete_graph(n) lists the edge j -> i as i n + j
        offsets = np.cumsum([0] + [g.num_nodes ** 2 for g in graphs])
        is_edge = np.zeros(offsets[-1], bool)
        for g, o in zip(graphs, offsets):
            is_edge[o + g.edge_index[1] * g.num_nodes + g.edge_index[0]] = True
    attend = graphs if arm == "graph" else [gtx.complete_graph(g.num_nodes) for g in graphs]
    return dict(z=np.concatenate([np.concatenate(xs), np.concatenate([pe(g) for g in graphs])], 1),
                t=np.concatenate(ts), g=gtx.batch_graphs(attend), sizes=[g.num_nodes for g in graphs],
                is_edge=is_edge)


def learn_loss(P, b, d_x, with_grads=True):
    """MSE on the first d_x output columns and the gradient of every entry of P."""
    bias = None if b["is_edge"] is None else b["is_edge"][:, None] * P["edge_b"]   # (E, H)
    y, cache = gtx.forward(b["z"], b["g"], {k: v for k, v in P.items() if k != "edge_b"},
                           edge_bias=bias)
    err = y[:, :b["t"].shape[1]] - b["t"]
    if not with_grads:
        return np.mean(err ** 2), None
    dy = np.zeros_like(y)
    dy[:, :d_x] = 2 * err / err.size
    _, grads = gtx.backward(dy, cache)
    if bias is not None:                          # dL/db_h: the sum of dL/ds over the graph's edges
        grads["edge_b"] = grads.pop("edge_bias")[b["is_edge"]].sum(0)
    return np.mean(err ** 2), grads


def train_arm(arm, train, test, seed, steps, batch=16, d_x=8, k=8, H=4, lr=3e-2):
    """Held-out MSE / var(target) after training one arm with Adam on fixed minibatches."""
    rng = np.random.default_rng(seed)
    P = gtx.init_params(d_x + k, H, rng=rng)
    if arm == "complete+edge_bias":
        P["edge_b"] = np.zeros(H)                 # starts as plain complete: edges must be learned
    batches = [learn_batch(arm, train[i:i + batch], k) for i in range(0, len(train), batch)]
    state = adam_state(P)
    for step in range(1, steps + 1):
        b = batches[step % len(batches)]
        if arm == "complete+laplacian":           # eigenvector signs are arbitrary: flip per graph
            flips = np.repeat(rng.choice([-1.0, 1.0], (len(b["sizes"]), k)), b["sizes"], 0)
            b = dict(b, z=np.concatenate([b["z"][:, :d_x], b["z"][:, d_x:] * flips], 1))
        _, grads = learn_loss(P, b, d_x)
        adam(P, grads, state, step, lr)
    b = learn_batch(arm, test, k)
    return learn_loss(P, b, d_x, with_grads=False)[0] / b["t"].var()


def adam_state(P):
    """Adam's moments m and v, zero, for every entry of P."""
    return {n: (np.zeros_like(p), np.zeros_like(p)) for n, p in P.items()}


def adam(P, grads, state, step, lr, b1=0.9, b2=0.999, eps=1e-8):
    """One bias-corrected Adam step (Kingma & Ba 2015, as torch.optim.Adam), in place on P."""
    for n, (m, v) in state.items():
        m[:] = b1 * m + (1 - b1) * grads[n]
        v[:] = b2 * v + (1 - b2) * grads[n] ** 2
        P[n] -= lr * (m / (1 - b1 ** step)) / (np.sqrt(v / (1 - b2 ** step)) + eps)


def learn(mode):
    """{arm: [held-out relative MSE per seed]} for LEARN[mode]; every arm sees a seed's data."""
    c, runs = LEARN[mode], {arm: [] for arm in ARMS}
    for seed in c["seeds"]:
        rng = np.random.default_rng(1000 + seed)
        train, test = learn_graphs(c["n_train"], rng), learn_graphs(c["n_test"], rng)
        for arm in ARMS:
            runs[arm].append(train_arm(arm, train, test, seed, c["steps"]))
            progress(f"learn: seed {seed} {arm}: {runs[arm][-1]:.3f}")
    return runs


def learn_report(runs, seconds):
    """The table and a verdict line, from the measured figures."""
    m = {arm: float(np.mean(r)) for arm, r in runs.items()}
    lines = [f"what the graph buys: held-out MSE / var(target), mean (min-max) over "
             f"{len(runs['graph'])} seeds, {seconds:.0f} s"]
    lines += [f"  {arm:<21}{m[arm]:6.3f} ({min(r):.3f}-{max(r):.3f})" for arm, r in runs.items()]
    gap = m["complete"] - m["graph"]

    def share(arm):                             # of the gap, closed by arm
        if gap > 0:
            return f"{(m['complete'] - m[arm]) / gap:.0%}"
        return "n/a"
    lines.append(f"gap from complete ({m['complete']:.2f}) to graph ({m['graph']:.2f}) closed by "
                 f"sinusoidal {share('complete+sinusoidal')}, laplacian {share('complete+laplacian')}, "
                 f"edge_bias {share('complete+edge_bias')}")
    return lines


# ---------------------------------------------------------------- a GPT is a GNN on the causal graph
# A character-level language model from gtx's blocks: token embedding plus sinusoidal positions, 2
# pre-norm blocks on a batch of causal graphs (one per sequence), a linear head and cross-entropy,
# trained with Adam on the first 90% of Python's own documentation text (pydoc_data.topics) and
# scored in bits per character on the last 10%, beside unigram and bigram counts of the training
# text. The text ships with every CPython: nothing is downloaded.
GPT = dict(test=dict(T=16, B=4, D=16, H=2, steps=10, lr=1e-2),
           quick=dict(T=32, B=8, D=32, H=2, steps=250, lr=1e-2),
           default=dict(T=64, B=16, D=64, H=4, steps=900, lr=1e-2))
GPT_LAYERS = 2


def gpt_data():
    """(vocabulary, train ids, held-out ids): the text's characters as ids, split 90/10."""
    from pydoc_data.topics import topics
    text = "".join(topics.values())                 # about 465k characters of Python's docs
    vocab = sorted(set(text))
    ids = np.searchsorted(np.array(vocab), np.array(list(text)))
    cut = int(0.9 * len(ids))
    return vocab, ids[:cut], ids[cut:]


def gpt_init(V, c, rng, dtype):
    """Embedding (V, D), the blocks' params as "block{l}.{key}", head (D, V) and (V,)."""
    D = c["D"]
    P = {"emb": rng.standard_normal((V, D)).astype(dtype)}
    for layer in range(GPT_LAYERS):
        for key, a in gtx.init_block(D, c["H"], rng=rng, dtype=dtype).items():
            P[f"block{layer}.{key}"] = a
    bound = math.sqrt(6 / (D + V))
    P["head_W"] = rng.uniform(-bound, bound, (D, V)).astype(dtype)
    P["head_b"] = np.zeros(V, dtype)
    return P


def gpt_block(P, layer):
    prefix = f"block{layer}."
    return {key[len(prefix):]: a for key, a in P.items() if key.startswith(prefix)}


def gpt_forward(P, inp, backend="auto"):
    """Logits (N, V) after the tokens inp (B, T), N = B T, and what gpt_loss's backward needs: the
    last block's output x (N, D) and the blocks' caches. A batch is one graph: B causal graphs."""
    B, T = inp.shape
    pe = np.tile(gtx.sinusoidal_pe(T, P["emb"].shape[1]), (B, 1)).astype(P["emb"].dtype)
    x = P["emb"][inp.reshape(-1)] + pe                                  # (N, D)
    caches = []
    for layer in range(GPT_LAYERS):
        x, cache = gtx.block_forward(x, gpt_graph(B, T), gpt_block(P, layer), backend=backend)
        caches.append(cache)
    return x @ P["head_W"] + P["head_b"], x, caches                     # (N, V), (N, D)


def gpt_loss(P, tokens, backend="auto", with_grads=True):
    """Mean cross-entropy (nats) of predicting tokens[:, 1:] from tokens[:, :-1] (B, T + 1), and
    the gradient of every entry of P."""
    inp, tgt = tokens[:, :-1], tokens[:, 1:].reshape(-1)                # (B, T), (N,)
    logits, x, caches = gpt_forward(P, inp, backend)                    # (N, V)
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))        # (N, V) log-softmax
    rows = np.arange(tgt.size)
    loss = -logp[rows, tgt].mean()
    if not with_grads:
        return loss, None
    dlogits = np.exp(logp)                                              # softmax - onehot, / N
    dlogits[rows, tgt] -= 1
    dlogits /= tgt.size
    grads = {"head_W": x.T @ dlogits, "head_b": dlogits.sum(0)}
    dx = dlogits @ P["head_W"].T
    for layer in reversed(range(GPT_LAYERS)):
        dx, block_grads = gtx.block_backward(dx, caches[layer])
        grads.update({f"block{layer}.{key}": d for key, d in block_grads.items()})
    grads["emb"] = np.zeros_like(P["emb"])
    np.add.at(grads["emb"], inp.reshape(-1), dx)
    return loss, grads


@functools.cache
def gpt_graph(B, T):                    # made once: dense's blocks and masks are kept with it
    return gtx.batch_graphs([gtx.causal_graph(T)] * B)


def gpt_batch(ids, rng, B, T):
    """B random windows of T + 1 characters: (B, T + 1)."""
    starts = rng.integers(0, ids.size - T, B)                           # the last window ends at -1
    return ids[starts[:, None] + np.arange(T + 1)]


def gpt_windows(ids, T):
    """ids cut into windows of T + 1 that overlap by one: (n, T + 1). Each character after the
    first is a target once, predicted from the 1 to T characters before it in its window."""
    n = (ids.size - 1) // T
    return ids[np.arange(n)[:, None] * T + np.arange(T + 1)]


def gpt_bits(P, windows, B):
    """Bits per character of the model on the windows' targets, B windows to a batch."""
    nats = [gpt_loss(P, windows[b:b + B], with_grads=False)[0] * len(windows[b:b + B])
            for b in range(0, len(windows), B)]
    return sum(nats) / len(windows) / math.log(2)


def count_bits(train, targets, before, V):
    """Bits per character of add-one (Laplace) smoothed unigram and bigram counts of train, on the
    targets, each after the character before it."""
    uni = np.bincount(train, minlength=V) + 1.0
    bi = np.ones((V, V))
    np.add.at(bi, (train[:-1], train[1:]), 1)
    unigram = -np.log2(uni[targets] / uni.sum()).mean()
    bigram = -np.log2(bi[before, targets] / bi[before].sum(1)).mean()
    return float(unigram), float(bigram)


def gpt_sample(P, vocab, prompt, n, T, rng, temperature=0.8):
    """n characters after prompt, each drawn from the model's softmax / temperature."""
    ids = [vocab.index(ch) for ch in prompt]
    for _ in range(n):
        logits = gpt_forward(P, np.array([ids[-T:]]))[0][-1] / temperature   # (V,)
        p = np.exp(logits - logits.max())
        ids.append(int(rng.choice(p.size, p=p / p.sum())))
    return "".join(vocab[i] for i in ids[len(prompt):])


def gpt(mode, dtype):
    """Train, then score: {bits per character of the model and the baselines, on every held-out
    window and on those not found verbatim in the training text, seconds, a sample}."""
    c = GPT[mode]
    warm_up(dtype)                                  # Numba's compile stays out of the timing
    rng = np.random.default_rng(SEED)
    vocab, train, test = gpt_data()
    P = gpt_init(len(vocab), c, rng, dtype)
    state = adam_state(P)
    t0 = time.perf_counter()
    for step in range(1, c["steps"] + 1):
        loss, grads = gpt_loss(P, gpt_batch(train, rng, c["B"], c["T"]))
        adam(P, grads, state, step, c["lr"] * min(1, 2 * (1 - step / (c["steps"] + 1))))
        if step % 100 == 0 or step == c["steps"]:
            progress(f"gpt: step {step}/{c['steps']}: train loss {loss / math.log(2):.3f} bits/char")
    r = dict(c, train_s=time.perf_counter() - t0, vocab=len(vocab))
    windows = gpt_windows(test, c["T"])
    text = "".join(vocab[i] for i in train)         # the docs repeat passages across topics
    novel = np.array(["".join(vocab[i] for i in w) not in text for w in windows])
    for name, w in (("", windows), ("novel_", windows[novel])):
        r[name + "bits"] = float(gpt_bits(P, w, c["B"]))
        r[name + "unigram"], r[name + "bigram"] = count_bits(train, w[:, 1:].reshape(-1),
                                                             w[:, :-1].reshape(-1), len(vocab))
        r[name + "chars"] = int(w[:, 1:].size)
    r["sample"] = gpt_sample(P, vocab, "The ", 200, c["T"], np.random.default_rng(SEED))
    r["total_s"] = time.perf_counter() - t0
    return r


def gpt_report(r):
    """The verdict lines and a sample of the model's text, from the measured figures."""
    return [f"a GPT on causal graphs: {GPT_LAYERS} blocks, D/H {r['D']}/{r['H']}, context {r['T']}, "
            f"{r['steps']} steps of {r['B']} sequences, {r['train_s']:.1f} s training",
            f"  held-out bits/char: model {r['bits']:.3f}, bigram {r['bigram']:.3f}, unigram "
            f"{r['unigram']:.3f} ({r['chars']:,} chars; {r['total_s']:.0f} s in all)",
            f"  on the {r['novel_chars'] / r['chars']:.0%} not verbatim in the training text: model "
            f"{r['novel_bits']:.3f}, bigram {r['novel_bigram']:.3f}, unigram {r['novel_unigram']:.3f}",
            "  sample after 'The ': " + repr(r["sample"][:60]),
            "  " + repr(r["sample"][60:120])]


# ---------------------------------------------------------------- molecules: what the graph buys on real data
# One model in six arms that differ only in what attention sees: atom features (OGB's) and the arm's
# encoding, a linear embedding, MOL_LAYERS pre-norm blocks, the mean over each molecule's atoms and
# a linear head, trained with Adam on the MSE of the standardised target. Two targets: measured
# solubility (Huuskonen 2000, data/solubility.csv, its test split as given, a fifth of its training
# molecules for validation), nearly additive over atoms, and ZINC's penalized logP as the field
# standardises it, on 12,000 of MOSES's ZINC molecules (data/zinc.csv), which depends on rings.
# Each arm trains until validation stops improving and is scored on test at its best validation
# step; the learning rate and schedule were tuned once, for every arm together, on validation only.
try:
    from rdkit import Chem, RDConfig, RDLogger
    from rdkit.Chem import Crippen, Descriptors
except ImportError:                             # bench runs its other parts and says so
    Chem = None

MOL_ARMS = ("bonds", "bonds+rwse", "complete", "complete+laplacian", "complete+rwse", "complete+spd")
# steps and eval, per target: the step cap, and validation every that many steps; patience:
# evaluations without a new best before a run stops; warmup: steps of linear warm-up, then the
# schedule. lr and schedule: molecules_tune's best (its grid and scores are in its docstring).
MOL = dict(quick=dict(n_mols=96, D=16, H=2, batch=16, lr=3e-3, warmup=5, schedule="cosine",
                      steps=dict(solubility=40, zinc=40), eval=dict(solubility=5, zinc=5), patience=1),
           default=dict(n_mols=1000, D=64, H=4, batch=32, lr=8e-3, warmup=50, schedule="cosine",
                        steps=dict(solubility=100, zinc=150), eval=dict(solubility=25, zinc=50), patience=3),
           full=dict(n_mols=None, D=64, H=4, batch=64, lr=8e-3, warmup=100, schedule="cosine",
                     steps=dict(solubility=500, zinc=1500), eval=dict(solubility=50, zinc=250), patience=4))
MOL_LAYERS, MOL_K, MOL_HOPS = 2, 8, 10          # blocks; encoding columns; hops capped at 10
ELEMENTS = ("C", "N", "O", "F", "P", "S", "Cl", "Br", "I")   # then one column for any other
CHARGES, MAX_HS, MAX_DEGREE = (-1, 0, 1), 4, 5  # the last column of each: anything beyond
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SOLUBILITY_CSV = os.path.join(DATA, "solubility.csv")
ZINC_CSV = os.path.join(DATA, "zinc.csv")
# JT-VAE's (Jin et al. 2018) mean and std of each term of penalized logP over the 250k ZINC
# molecules; ZINC-12k's target, and so the anchors', is the sum of the three standardised terms.
ZINC_STATS = dict(logp=(2.4570953396190123, 1.434324401111988),
                  neg_sa=(-3.0525811293166134, 0.8335207024513095),
                  neg_cycle=(-0.0485696876403053, 0.2860212110245455))
ZINC_SPLIT = (("train", 10_000), ("val", 1_000), ("test", 1_000))

def one_hot(value, choices):
    """Indicator of value among choices, the last column meaning none of them."""
    out = [0.0] * (len(choices) + 1)
    if value in choices:
        out[choices.index(value)] = 1.0
    else:
        out[-1] = 1.0
    return out


def atom_features(atom):
    """OGB's smiles2graph atom features, one-hot: element, aromatic, formal charge, hydrogens
    (explicit and implicit), heavy-atom degree, in a ring."""
    return (one_hot(atom.GetSymbol(), ELEMENTS) + [float(atom.GetIsAromatic())]
            + one_hot(atom.GetFormalCharge(), CHARGES) + one_hot(atom.GetTotalNumHs(), tuple(range(MAX_HS)))
            + one_hot(atom.GetDegree(), tuple(range(MAX_DEGREE))) + [float(atom.IsInRing())])


N_FEATURES = len(ELEMENTS) + 1 + 1 + len(CHARGES) + 1 + MAX_HS + 1 + MAX_DEGREE + 1 + 1


def parse_smiles(smiles, row):
    """The RDKit molecule of a SMILES string; a ValueError naming the row if RDKit cannot read it."""
    if not isinstance(smiles, str):
        raise TypeError(f"row {row}: SMILES must be a str, got {type(smiles).__name__}")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        raise ValueError(f"row {row}: RDKit cannot parse the SMILES {smiles!r}")
    return mol


def mol_graph(mol):
    """(x (N, N_FEATURES) atom features, the bond graph): each bond two edges, one each way."""
    x = np.array([atom_features(a) for a in mol.GetAtoms()]).reshape(-1, N_FEATURES)
    ends = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()],
                    np.int64).reshape(-1, 2).T                          # (2, bonds)
    return x, gtx.Graph(np.concatenate([ends, ends[::-1]], 1), len(x))


@functools.cache
def sa_scorer():
    """RDKit Contrib's sascorer (Ertl and Schuffenhauer 2009), imported as RDKit's docs do."""
    sys.path.append(os.path.join(RDConfig.RDContribDir, "SA_Score"))
    import sascorer
    return sascorer


def ring_penalty(mol):
    """max(0, largest ring size - 6), rings as RDKit's ring info lists them (the smallest set of
    smallest rings). JT-VAE's code takes networkx's cycle_basis of the bond graph instead, which
    differs on 19 of data/zinc.csv's 12,000 molecules (make_zinc counts them)."""
    rings = [len(r) for r in mol.GetRingInfo().AtomRings()]
    return max(0, max(rings, default=0) - 6)


def penalized_logp(mol):
    """ZINC's target as the field uses it: Crippen logP, minus the SA score, minus ring_penalty,
    each term standardised by JT-VAE's ZINC_STATS, then summed."""
    terms = dict(logp=Crippen.MolLogP(mol), neg_sa=-sa_scorer().calculateScore(mol), neg_cycle=-ring_penalty(mol))
    return sum((terms[k] - mean) / std for k, (mean, std) in ZINC_STATS.items())


def solubility_data():
    """{"train": [(mol, y)], "test": [...]} from data/solubility.csv, y = log10 of mol/L."""
    import csv
    out = {"train": [], "test": []}
    with open(SOLUBILITY_CSV, newline="") as f:
        for row, r in enumerate(csv.DictReader(f), start=2):           # row 1 is the header
            if r["split"] not in out:
                raise ValueError(f"{SOLUBILITY_CSV} row {row}: split must be train or test, got {r['split']!r}")
            out[r["split"]].append((parse_smiles(r["smiles"], row), float(r["sol"])))
    return out


def zinc_data(first=None):
    """{"train", "val", "test"}: data/zinc.csv's molecules by its split column, as (mol, standardised
    penalized logP). With first=n only the first n of train and n // 2 of the others (--quick)."""
    import csv
    out = {name: [] for name, _ in ZINC_SPLIT}
    with open(ZINC_CSV, newline="") as f:
        for row, r in enumerate(csv.DictReader(f), start=2):           # row 1 is the header
            if r["split"] not in out:
                raise ValueError(f"{ZINC_CSV} row {row}: split must be train, val or test, got {r['split']!r}")
            out[r["split"]].append((r["smiles"], float(r["penalized_logp"]), row))
    if first is not None:
        out = dict(train=out["train"][:first], val=out["val"][:first // 2], test=out["test"][:first // 2])
    return {name: [(parse_smiles(s, row), y) for s, y, row in v] for name, v in out.items()}


def jtvae_ring_penalty(mol):
    """ring_penalty as JT-VAE's code computes it: the longest cycle of networkx's cycle_basis."""
    import networkx as nx
    g = nx.Graph([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()])
    return max(0, max((len(c) for c in nx.cycle_basis(g)), default=0) - 6)


def make_zinc(wheel, path=ZINC_CSV):
    """Writes data/zinc.csv from molsets 0.3.1's wheel (MOSES, MIT licence; `pip download
    molsets==0.3.1 --no-deps`): 12,000 of the 1.76M SMILES of its train and test files, drawn with
    SEED, split 10,000 / 1,000 / 1,000 in the order drawn, each RDKit's canonical SMILES with its
    target recomputed by penalized_logp. Run as python bench.py --make-zinc WHEEL."""
    import csv
    import gzip
    import zipfile
    smiles = []
    with zipfile.ZipFile(wheel) as z:
        for part in ("train", "test"):
            lines = gzip.decompress(z.read(f"moses/dataset/data/{part}.csv.gz")).decode().splitlines()
            if lines[0] != "SMILES":
                raise ValueError(f"{wheel}: {part}.csv.gz starts {lines[0]!r}, not the header SMILES")
            smiles += lines[1:]
    n = sum(k for _, k in ZINC_SPLIT)
    picked = np.random.default_rng(SEED).choice(len(smiles), n, replace=False)
    splits = np.repeat([name for name, _ in ZINC_SPLIT], [k for _, k in ZINC_SPLIT])
    try:
        import networkx                         # only to count where JT-VAE's ring term differs
    except ImportError:
        networkx = None
    rows, differ = [], 0
    for i, split in zip(picked, splits):
        mol = parse_smiles(smiles[i], f"{i} of MOSES's train then test")
        rows.append((Chem.MolToSmiles(mol), split, repr(penalized_logp(mol))))
        if networkx is not None and jtvae_ring_penalty(mol) != ring_penalty(mol):
            differ += 1
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("smiles", "split", "penalized_logp"))
        w.writerows(rows)
    print(f"{path}: {n:,} of {len(smiles):,} MOSES molecules, " + ", ".join(f"{k:,} {s}" for s, k in ZINC_SPLIT))
    if networkx is None:
        print("networkx is not installed, so JT-VAE's cycle_basis ring term was not compared")
    else:
        print(f"JT-VAE's cycle_basis ring term differs from RDKit's ring info on {differ} of {n:,}")


def spd_buckets(hops):
    """(E,) a bucket per hop count: 0 to MOL_HOPS (hops capped there), MOL_HOPS + 1 for no path."""
    return np.where(hops < 0, MOL_HOPS + 1, np.minimum(hops, MOL_HOPS))


def spd_bias(table, buckets):
    """(E, H) edge_bias: each edge's bucket column of the learned (H, buckets) table."""
    return table[:, buckets].T


def spd_bias_grad(d_bias, buckets, n_buckets):
    """(H, buckets) gradient of the table: each edge's d_bias (E, H) summed into its bucket."""
    grad = np.zeros((n_buckets, d_bias.shape[1]), d_bias.dtype)        # (buckets, H)
    np.add.at(grad, buckets, d_bias)
    return grad.T


def mol_records(data):
    """Per molecule, computed once for every arm: the RDKit molecule, y, atom features x (n, F),
    the bond graph, random_walk_pe and laplacian_pe (n, MOL_K) and SPD buckets (n n,) in
    complete_graph(n)'s edge order. The walks and hops are one call each on the whole set."""
    recs = []
    for mol, y in data:
        x, bonds = mol_graph(mol)
        recs.append(dict(mol=mol, y=y, x=x, bonds=bonds, laplacian=gtx.laplacian_pe(bonds, MOL_K)))
    bonds = gtx.batch_graphs([r["bonds"] for r in recs])
    pairs = gtx.batch_graphs([gtx.complete_graph(r["bonds"].num_nodes) for r in recs])
    rwse = gtx.random_walk_pe(bonds, MOL_K)                                 # (N, MOL_K)
    buckets = spd_buckets(gtx.shortest_path_lengths(bonds, pairs))         # (E_pairs,)
    edge_ptr = np.cumsum([0] + [r["bonds"].num_nodes ** 2 for r in recs])
    for r, n0, n1, e0, e1 in zip(recs, bonds.ptr, bonds.ptr[1:], edge_ptr, edge_ptr[1:]):
        r["rwse"], r["buckets"] = rwse[n0:n1], buckets[e0:e1]
    return recs


def mol_encoding(arm, rec):
    """(n, columns) what the arm adds to the atom features: none, random_walk_pe or laplacian_pe."""
    if arm.endswith("rwse"):
        return rec["rwse"]
    if arm == "complete+laplacian":
        return rec["laplacian"]
    return np.zeros((len(rec["x"]), 0))


def mol_batch(arm, recs, mean, std):
    """One block-diagonal batch: input z (N, F), the graph attended over, the molecules' sizes and
    (B+1,) node offsets, the standardised targets (B,), SPD buckets (E,) for complete+spd and each atom's molecule."""
    sizes = np.array([len(r["x"]) for r in recs])
    ptr = np.cumsum(np.append(0, sizes))
    if arm.startswith("bonds"):                 # the bonds and a self-loop on every atom
        edges = [r["bonds"].edge_index + o for r, o in zip(recs, ptr)]
        loops = np.arange(ptr[-1])
        g = gtx.Graph(np.concatenate(edges + [np.stack([loops, loops])], 1), int(ptr[-1]))
    else:
        g = gtx.batch_graphs([gtx.complete_graph(int(n)) for n in sizes])
    buckets = None
    if arm == "complete+spd":                   # in g's edge order: the molecules' pairs in turn
        buckets = np.concatenate([r["buckets"] for r in recs])
    z = np.concatenate([np.concatenate([r["x"], mol_encoding(arm, r)], 1) for r in recs])
    return dict(z=z, g=g, sizes=sizes, ptr=ptr, t=(np.array([r["y"] for r in recs]) - mean) / std,
                buckets=buckets, mol=np.repeat(np.arange(sizes.size), sizes))


def mol_init(arm, n_in, c, rng, dtype):
    """Embedding (F, D) and (D,), the blocks as "block{l}.{key}", head (D,) and (1,); for
    complete+spd the (H, buckets) hop table, zero: it starts as plain complete."""
    D = c["D"]
    bound = math.sqrt(6 / (n_in + D))
    P = {"emb_W": rng.uniform(-bound, bound, (n_in, D)).astype(dtype), "emb_b": np.zeros(D, dtype)}
    for layer in range(MOL_LAYERS):
        for key, a in gtx.init_block(D, c["H"], rng=rng, dtype=dtype).items():
            P[f"block{layer}.{key}"] = a
    P["head_W"] = rng.uniform(-math.sqrt(6 / (D + 1)), math.sqrt(6 / (D + 1)), D).astype(dtype)
    P["head_b"] = np.zeros(1, dtype)
    if arm == "complete+spd":
        P["spd"] = np.zeros((c["H"], MOL_HOPS + 2), dtype)
    return P


def mol_loss(P, b, z=None, with_grads=True):
    """Predictions (B,), the MSE on b's standardised targets and the gradient of every entry of P.
    One hop table serves every block (Graphormer's), so its gradient sums over the blocks."""
    z = b["z"] if z is None else z
    dtype = P["emb_W"].dtype
    bias = None if b["buckets"] is None else spd_bias(P["spd"], b["buckets"])      # (E, H)
    h, caches = z.astype(dtype) @ P["emb_W"] + P["emb_b"], []                       # (N, D)
    for layer in range(MOL_LAYERS):
        h, cache = gtx.block_forward(h, b["g"], gpt_block(P, layer), edge_bias=bias)
        caches.append(cache)
    pooled = np.add.reduceat(h, b["ptr"][:-1], 0) / b["sizes"][:, None].astype(dtype)   # (B, D)
    pred = pooled @ P["head_W"] + P["head_b"]                                      # (B,)
    err = pred - b["t"].astype(dtype)
    loss = float(np.mean(err ** 2))
    if not with_grads:
        return pred, loss, None
    d_pred = 2 * err / err.size                                                     # (B,)
    grads = {"head_W": pooled.T @ d_pred, "head_b": d_pred.sum(keepdims=True)}
    dh = (np.outer(d_pred, P["head_W"]) / b["sizes"][:, None].astype(dtype))[b["mol"]]  # (N, D)
    if bias is not None:
        grads["spd"] = np.zeros_like(P["spd"])
    for layer in reversed(range(MOL_LAYERS)):
        dh, block_grads = gtx.block_backward(dh, caches[layer])
        if bias is not None:
            grads["spd"] += spd_bias_grad(block_grads.pop("edge_bias"), b["buckets"], P["spd"].shape[1])
        grads.update({f"block{layer}.{key}": d for key, d in block_grads.items()})
    grads["emb_W"] = z.T.astype(dtype) @ dh
    grads["emb_b"] = dh.sum(0)
    return pred, loss, grads


def mol_predict(P, batches):
    """(molecules,) standardised predictions over the batches, in order."""
    return np.concatenate([mol_loss(P, b, with_grads=False)[0] for b in batches])


def mol_batches(arm, recs, batch, mean, std, order=None):
    """The molecules' records in batches of batch (in the given order), targets standardised."""
    order = np.arange(len(recs)) if order is None else order
    return [mol_batch(arm, [recs[i] for i in order[s:s + batch]], mean, std)
            for s in range(0, len(order), batch)]


def mol_metric(metric, pred, y):
    if metric == "rmse":
        return float(np.sqrt(np.mean((pred - y) ** 2)))
    return float(np.mean(np.abs(pred - y)))


def mol_lr(c, step, cap):
    """The learning rate at step: linear warm-up over c["warmup"] steps, then c["lr"] held
    (schedule "constant") or decayed along a cosine to 0 at the step cap ("cosine")."""
    if step <= c["warmup"]:
        return c["lr"] * step / c["warmup"]
    if c["schedule"] == "constant":
        return c["lr"]
    done = (step - c["warmup"]) / max(1, cap - c["warmup"])
    return c["lr"] * 0.5 * (1 + math.cos(math.pi * done))


def stalled(curve, patience):
    """Whether the last patience evaluations of curve [(step, val metric)] all failed to beat the
    best before them."""
    if len(curve) <= patience:
        return False
    vals = [v for _, v in curve]
    return min(vals[-patience:]) >= min(vals[:-patience])


def mol_train(arm, data, c, cap, every, seed, dtype, metric):
    """Trains one arm on data["train"] with Adam, a fresh shuffle each epoch, and scores
    data["val"] every that many steps; stops at step cap or when validation has not improved for
    c["patience"] evaluations. Returns the train, val and test metric (the target's units) of the
    parameters at the best validation step, that step, the curve [(step, val metric)], seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    train = data["train"]
    ys = np.array([r["y"] for r in train])
    mean, std = ys.mean(), ys.std()
    y_val = np.array([r["y"] for r in data["val"]])
    eval_val = mol_batches(arm, data["val"], 256, mean, std)
    batches = []
    P = mol_init(arm, N_FEATURES + mol_encoding(arm, train[0]).shape[1], c, rng, dtype)
    state = adam_state(P)
    curve, best, best_step, curve_best = [], None, 0, math.inf    # the best so far: its parameters, step, metric
    for step in range(1, cap + 1):
        if not batches:                         # a new epoch: a new order, whole batches only
            batches = mol_batches(arm, train, c["batch"], mean, std, rng.permutation(len(train)))
            batches = batches[:max(1, len(train) // c["batch"])]
        b = batches.pop()
        z = None
        if arm == "complete+laplacian":           # eigenvector signs are arbitrary: flip per molecule
            flips = np.repeat(rng.choice([-1.0, 1.0], (b["sizes"].size, MOL_K)), b["sizes"], 0)
            z = np.concatenate([b["z"][:, :N_FEATURES], b["z"][:, N_FEATURES:] * flips], 1)
        _, _, grads = mol_loss(P, b, z)
        adam(P, grads, state, step, mol_lr(c, step, cap))
        if step % every == 0 or step == cap:
            curve.append((step, mol_metric(metric, mean + std * mol_predict(P, eval_val), y_val)))
            if curve[-1][1] < curve_best:
                best = {k: v.copy() for k, v in P.items()}
                best_step, curve_best = step, curve[-1][1]
            if stalled(curve, c["patience"]):
                break
    out = dict(val=curve_best, best_step=best_step, curve=curve)
    for name in ("train", "test"):
        y = np.array([r["y"] for r in data[name]])
        pred = mean + std * mol_predict(best, mol_batches(arm, data[name], 256, mean, std))
        out[name] = mol_metric(metric, pred, y)
    out["seconds"] = time.perf_counter() - t0
    return out


def atom_counts(recs):
    """(molecules, N_FEATURES + 1): each molecule's sum of atom features, and a 1 for the intercept."""
    return np.array([np.append(r["x"].sum(0), 1.0) for r in recs])


def esol_descriptors(recs):
    """(molecules, 5) ESOL's clogP, MW, rotatable bonds, aromatic proportion, and a 1."""
    rows = []
    for m in (r["mol"] for r in recs):
        aromatic = sum(a.GetIsAromatic() for a in m.GetAtoms()) / m.GetNumAtoms()
        rows.append([Crippen.MolLogP(m), Descriptors.MolWt(m), Descriptors.NumRotatableBonds(m),
                     aromatic, 1.0])
    return np.array(rows)


def mol_baselines(train, test, metric, esol):
    """Test metric of the training mean, least squares on atom-feature counts and, for
    solubility, ESOL (Delaney 2004) as published and refit by least squares on train."""
    y, y_test = np.array([r["y"] for r in train]), np.array([r["y"] for r in test])
    out = {"mean": mol_metric(metric, np.full(len(test), y.mean()), y_test)}
    w = np.linalg.lstsq(atom_counts(train), y, rcond=None)[0]
    out["bag_of_atoms"] = mol_metric(metric, atom_counts(test) @ w, y_test)
    if esol:
        d = esol_descriptors(test)
        out["esol_published"] = mol_metric(metric, d @ np.array([-0.63, -0.0062, 0.066, -0.74, 0.16]), y_test)
        w = np.linalg.lstsq(esol_descriptors(train), y, rcond=None)[0]
        out["esol_refit"] = mol_metric(metric, d @ w, y_test)
    return out


def mol_targets(c):
    """{target: (metric, {"train", "val", "test"} as mol_records, has ESOL)}; with c["n_mols"] the
    first molecules of each split. Solubility's validation is a fifth of a shuffle of its training
    molecules, which then trains on the other four fifths."""
    sol = solubility_data()
    zinc = zinc_data(first=c["n_mols"])
    if c["n_mols"] is not None:
        sol = dict(train=sol["train"][:c["n_mols"]], test=sol["test"][:c["n_mols"] // 2])
    shuffled = [sol["train"][i] for i in np.random.default_rng(SEED).permutation(len(sol["train"]))]
    cut = len(shuffled) * 4 // 5
    sol = dict(train=shuffled[:cut], val=shuffled[cut:], test=sol["test"])
    progress("molecules: solubility " + ", ".join(f"{len(v)} {k}" for k, v in sol.items())
             + "; ZINC " + ", ".join(f"{len(v)} {k}" for k, v in zinc.items()))
    return dict(solubility=("rmse", {k: mol_records(v) for k, v in sol.items()}, True),
                zinc=("mae", {k: mol_records(v) for k, v in zinc.items()}, False))


def molecules(mode, seeds, dtype):
    """The JSON record: per target its metric, sizes, baselines, per arm the test, train and
    validation metric and best step per seed and the mean seconds of a seed's run, and per arm the
    first seed's validation curve [(step, metric)]; None without RDKit."""
    if Chem is None:
        return None
    c = MOL[mode]
    warm_up(dtype)                                  # Numba's compile stays out of the timing
    # The blocks' matmuls outside gtx's kernels are small ((N, 64) by (64, 256)): on 2 shared
    # cores one BLAS thread ran them in 0.9 ms, two threads in 8 ms, spinning against the others.
    with threadpool_limits(1, user_api="blas"):
        return molecules_run(c, seeds, dtype)


def molecules_run(c, seeds, dtype):
    """molecules' record, BLAS on one thread. Seeds are the outer loop, so that a run stopped early
    has whole seeds in its progress lines."""
    targets = mol_targets(c)
    out = {}
    for target, (metric, data, esol) in targets.items():
        out[target] = dict(metric=metric, n_train=len(data["train"]), n_val=len(data["val"]),
                           n_test=len(data["test"]), baselines=mol_baselines(data["train"], data["test"], metric, esol),
                           arms={arm: dict(test=[], train=[], val=[], best_step=[], seconds=0.0) for arm in MOL_ARMS},
                           curves={})
    for seed in range(seeds):
        for target, (metric, data, _) in targets.items():
            for arm in MOL_ARMS:
                r = mol_train(arm, data, c, c["steps"][target], c["eval"][target], seed, dtype, metric)
                a = out[target]["arms"][arm]
                for key in ("test", "train", "val", "best_step"):
                    a[key].append(r[key])
                a["seconds"] += r["seconds"] / seeds            # the mean over seeds
                if seed == 0:
                    out[target]["curves"][arm] = r["curve"]
                progress(f"molecules: {target} {arm} seed {seed}: test {metric} {r['test']:.3f}, train "
                         f"{r['train']:.3f}, best validation {r['val']:.3f} at step {r['best_step']} of "
                         f"{r['curve'][-1][0]}, {r['seconds']:.1f} s")
    return out


def molecules_tune(grid=((1e-3, "cosine"), (2e-3, "cosine"), (4e-3, "cosine"), (8e-3, "cosine"),
                         (2e-3, "constant")), caps=(("solubility", 250), ("zinc", 750)), dtype=np.float32):
    """The one tuning of learning rate and schedule, for every arm together, on validation only:
    {(lr, schedule): the mean over both targets and all arms of the best validation metric over
    the validation metric of the training mean}. Each arm runs MOL["full"] with the shorter step
    caps (the shortened schedule; the cosine decays to 0 at the shortened cap). Run by hand
    (python -c "import bench; bench.molecules_tune()"), one part of the grid per process if you
    like; its best pair is MOL["full"]'s and MOL["default"]'s. Run at e650774 (these caps, seed 0)
    in two processes on 2 shared cores, about an hour; the mean ratio (solubility's, ZINC's):
    lr 1e-3 cosine 0.428 (0.416, 0.440); 2e-3 cosine 0.411 (0.393, 0.429); 4e-3 cosine 0.395
    (0.370, 0.419); 8e-3 cosine 0.388 (0.363, 0.414), the best; 2e-3 constant: solubility 0.409, and
    ZINC's bonds 0.316 MAE against 0.264 with cosine decay, when it was stopped for the --full run."""
    c = MOL["full"]
    scores = {}
    with threadpool_limits(1, user_api="blas"):     # as molecules
        targets = mol_targets(c)
    for target, (metric, data, _) in targets.items():
        y_fit, y_val = np.array([r["y"] for r in data["train"]]), np.array([r["y"] for r in data["val"]])
        base = mol_metric(metric, np.full(len(y_val), y_fit.mean()), y_val)
        cap = dict(caps)[target]
        for lr, schedule in grid:
            for arm in MOL_ARMS:
                with threadpool_limits(1, user_api="blas"):
                    r = mol_train(arm, data, dict(c, lr=lr, schedule=schedule), cap, c["eval"][target], 0, dtype, metric)
                scores.setdefault((lr, schedule), []).append(r["val"] / base)
                progress(f"tune: {target} lr {lr:g} {schedule} {arm}: validation {metric} {r['val']:.3f} "
                         f"at step {r['best_step']} of {cap}, {r['seconds']:.0f} s")
    table = {key: float(np.mean(v)) for key, v in scores.items()}
    for (lr, schedule), v in table.items():
        print(f"lr {lr:g} {schedule}: validation metric / the mean's, over targets and arms {v:.4f}")
    return table


MOL_NAMES = dict(solubility="solubility (log10 mol/L), test RMSE",
                 zinc="ZINC's penalized logP (standardised), test MAE")


def molecules_report(r, mode, seeds):
    """Two tables, one per target: arm, test mean (min-max) over seeds, train metric, best step,
    seconds; and for the default run, that it is short and how to start the full one."""
    if r is None:
        return ["molecules: not run, RDKit is not installed (pip install rdkit)"]
    c = MOL[mode]
    caps = ", ".join(f"{t} {c['steps'][t]} (every {c['eval'][t]})" for t in c["steps"])
    lines = [f"molecules: {MOL_LAYERS} pre-norm blocks, D/H {c['D']}/{c['H']}, batch {c['batch']}, "
             f"lr {c['lr']:g} {c['schedule']}, {seeds} seed(s)",
             f"  step caps (validation): {caps}; patience {c['patience']} evaluations;",
             "  test scored at each run's best validation step"]
    if mode != "full":
        lines.append(f"  a short run ({mode}); until validation stops improving (about 20 min a seed, 2 cores):")
        lines.append("  python bench.py --only molecules --full")
    for target, t in r.items():
        lines.append(f"  {MOL_NAMES[target]}: {t['n_train']:,} train, {t['n_val']:,} val, {t['n_test']:,} test")
        lines.append(f"    {'arm':<20}{'test mean (min-max)':<24}{'/mean':>6}{'train':>7}{'step':>6}{'s/seed':>8}")
        for arm, a in t["arms"].items():
            spread = f"{np.mean(a['test']):.3f} ({min(a['test']):.3f}-{max(a['test']):.3f})"
            lines.append(f"    {arm:<20}{spread:<24}{np.mean(a['test']) / t['baselines']['mean']:6.2f}"
                         f"{np.mean(a['train']):7.3f}{np.mean(a['best_step']):6.0f}{a['seconds']:8.1f}")
        lines.append("    baselines: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in t["baselines"].items()))
    return lines


def molecules_plot(path, r):
    """Each arm's validation curve (the first seed's), one panel per target."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so no plot was written to {path}")
        return
    fig, axes = plt.subplots(1, len(r), figsize=(13, 5))
    for ax, (target, t) in zip(np.atleast_1d(axes), r.items()):
        for arm, curve in t["curves"].items():
            ax.plot(*zip(*curve), label=arm)
        ax.axhline(t["baselines"]["bag_of_atoms"], color="gray", ls=":", label="bag of atoms (test)")
        ax.set(xlabel="step", ylabel=f"validation {t['metric'].upper()}", title=MOL_NAMES[target].split(",")[0])
        ax.legend()
    fig.suptitle("gtx on molecules: validation error while training, one line per arm")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"molecules plot written to {os.path.abspath(path)}")


# ---------------------------------------------------------------- reporting

def fmt_ms(s):
    ms = s * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def fmt_count(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else str(n)


def total_s(row):
    return float(np.median(row["times"]["total"])) if "times" in row else None


HEADER = (f"{'workload':<12}{'N':>7}{'E':>8}  {'D/H/dh':<9}{'backend':<7}{'ms':>8} {'min-max':<12}"
          f"{'GF/s':>5}  check")


def print_row(rec, b):
    row = rec["rows"][b]
    print(f"{rec['name']:<12.12}{rec['N']:>7}{fmt_count(rec['E']):>8}  "
          f"{str(rec['D']) + '/' + str(rec['H']) + '/' + str(rec['dh']):<9}{b:<7}", end="")
    if "skip" in row:
        print(f"{'-':>8} not run: {row['skip']}", flush=True)
        return
    t, check = row["times"], row.get("check")
    spread = f"{fmt_ms(min(t['total']))}-{fmt_ms(max(t['total']))}" if len(t["total"]) > 1 else "(1 run)"
    gfs = useful_flops(rec["N"], rec["E"], rec["D"], rec["H"], rec["dh"]) / total_s(row) / 1e9
    note = (f"{'ok' if check['err'] <= TOL[DTYPE] else 'MISMATCH'} {check['err']:.0e}" if check else "")
    note += f" picked {row['picked']}" if b == "auto" else ""
    print(f"{fmt_ms(total_s(row)):>8} {spread:<12}{gfs:>5.3g}  {note}", flush=True)


def crossover(sweep):
    """Density where sparse and dense cost the same: the first rise of sparse/dense through 1,
    interpolated linearly in log(density) and log(time ratio)."""
    pts = [(r["E"] / r["N"] ** 2, total_s(r["rows"]["sparse"]) / total_s(r["rows"]["dense"]))
           for r in sweep if "times" in r["rows"]["sparse"] and "times" in r["rows"]["dense"]]
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if r0 < 1 <= r1:
            f = math.log(r0) / (math.log(r0) - math.log(r1))
            return math.exp(math.log(d0) + f * (math.log(d1) - math.log(d0)))
    return None


def ratio(a, b):
    return f"{a / b:.0f}x" if a / b >= 10 else f"{a / b:.1f}x"


def verdicts(recs, cross, n, memory):
    by = {r["name"]: r for r in recs}
    out = []

    def time_of(name, b):
        if name in by:
            return total_s(by[name]["rows"][b])
        return None

    def versus(name, what):
        d, s = time_of(name, "dense"), time_of(name, "sparse")
        if d and s:
            win, lose = ("dense", "sparse") if d < s else ("sparse", "dense")
            out.append(f"{what}: dense {fmt_ms(d)} ms, sparse {fmt_ms(s)} ms; "
                       f"{win} {ratio(max(d, s), min(d, s))} faster")
        elif d or s:
            ran, other = ("dense", "sparse") if d else ("sparse", "dense")
            out.append(f"{what}: {ran} {fmt_ms(d or s)} ms; {other} not run (see its row)")
    r = by.get("transformer")
    if r:
        versus("transformer", f"transformer (N={r['N']}, complete)")
    out.append(f"crossover at N={n}: dense is faster above density {100 * cross:.2g}%" if cross else
               f"no crossover at N={n} in the densities measured")
    for name in ("causal", "window", "long", "molecules", "powerlaw", "sparse"):
        if name in by:
            versus(name, f"{name} (N={by[name]['N']}, {by[name]['E'] / by[name]['N']:.0f} in-edges/node)")
    autos = []                                  # (auto's time / the faster one's, name, picked it)
    for r in (r for r in recs if "times" in r["rows"]["auto"]):
        fast = min((b for b in ("dense", "sparse") if "times" in r["rows"][b]),
                   key=lambda b: total_s(r["rows"][b]))
        autos.append((total_s(r["rows"]["auto"]) / total_s(r["rows"][fast]), r["name"],
                      r["rows"]["auto"]["picked"] == fast))
    if autos:
        worst = max(autos)
        out.append(f"auto: picked the faster backend on {sum(a[2] for a in autos)} of {len(autos)} "
                   f"workloads; worst time {worst[0]:.2f}x the faster ({worst[1]})")
    for name in ("long", "sparse"):
        peaks = {b: memory[name, b]["peak_bytes"] for b in ("dense", "sparse")
                 if "peak_bytes" in memory.get((name, b), {})}
        if peaks:
            not_run = {b: by[name]["needs"][b] for b in ("dense", "sparse") if b not in peaks}
            out.append(f"memory on {name}: " + ", ".join(f"{b} peak {v / MiB:,.0f} MiB" for b, v in peaks.items())
                       + "".join(f"; {b} would need {v / MiB:,.0f} MiB (gtx.{b}_bytes)" for b, v in not_run.items()))
    return out


def plot(path, recs, sweep, cross, n):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so no plot was written to {path}")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    for backend, style in (("dense", "o-"), ("sparse", "s-")):
        pts = [(100 * r["E"] / r["N"] ** 2, 1e3 * total_s(r["rows"][backend])) for r in sweep
               if "times" in r["rows"][backend]]
        a.plot(*zip(*pts), style, label=backend)
    if cross:
        a.axvline(100 * cross, color="gray", ls="-.", label=f"crossover {100 * cross:.2g}%")
    a.set(xscale="log", yscale="log", xlabel=f"density E/N^2 (%), N={n}", ylabel="forward+backward (ms)")
    a.legend()
    names, width = [r["name"] for r in recs], 0.27
    for k, backend in enumerate(("dense", "sparse", "auto")):
        b.bar(np.arange(len(recs)) + (k - 1) * width, [1e3 * (total_s(r["rows"][backend]) or 0) for r in recs],
              width, label=backend)
    b.set(xticks=range(len(recs)), yscale="log", ylabel="forward+backward (ms)")
    b.set_xticklabels(names, rotation=30)
    b.legend()
    fig.suptitle("gtx: dense blocks (BLAS matmuls) against sparse per-edge kernels")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {os.path.abspath(path)}")


def describe_machine(threads):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = [f"{i['internal_api']} {i.get('version')}" for i in threadpool_info() if i["user_api"] == "blas"]
    return dict(cpu=cpu, cores=os.cpu_count(), memory_gib=round(psutil.virtual_memory().total / 2**30),
                python=platform.python_version(), numpy=np.__version__, numba=numba.__version__,
                blas=blas, threads=threads, platform=platform.platform())


# ---------------------------------------------------------------- main

DTYPE = "float32"
PARTS = ("lottery", "learn", "gpt", "molecules")


def main():
    global DTYPE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes: runs in seconds")
    ap.add_argument("--only", choices=PARTS, help="run one part only")
    ap.add_argument("--seeds", type=int, default=1, help="seeds of the molecules part (3: the README's)")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--threads", type=int, help="gtx's threads (numba.set_num_threads)")
    ap.add_argument("--json", metavar="PATH", help="write every figure and the machine description")
    ap.add_argument("--plot", metavar="PATH", help="where the plot goes (default: bench-latest.png)")
    ap.add_argument("--full", action="store_true",
                    help="the molecules part trained until validation stops improving (about 20 min a seed on 2 cores)")
    ap.add_argument("--mol-plot", metavar="PATH",
                    help="where the molecules' learning curves go (with --full: molecules.png)")
    ap.add_argument("--make-zinc", metavar="WHEEL", help="rewrite data/zinc.csv from molsets 0.3.1's wheel")
    ap.add_argument("--child", help=argparse.SUPPRESS)   # internal: the fresh process of run_child
    args = ap.parse_args()
    if args.make_zinc:
        if Chem is None:
            ap.error("--make-zinc needs RDKit (pip install rdkit)")
        make_zinc(args.make_zinc)
        return
    if args.full and args.quick:
        ap.error("--full and --quick exclude each other")
    if args.child:
        task = json.loads(args.child)
        print(json.dumps((child_compile if task["task"] == "compile" else child_memory)(task)))
        return
    if args.threads is not None and not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        ap.error(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS)")
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {args.seeds}")
    DTYPE, threads = args.dtype, args.threads or numba.get_num_threads()
    dtype, cfg = np.dtype(args.dtype).type, config(args.quick)
    numba.set_num_threads(threads)
    machine = describe_machine(threads)
    print(f"gtx bench{' --quick' if args.quick else ''}: {machine['cpu']}, {machine['cores']} cores, "
          f"{machine['memory_gib']} GiB; {threads} threads; {args.dtype}\npython {machine['python']}, "
          f"numpy {machine['numpy']} ({', '.join(machine['blas'])}), numba {machine['numba']}")
    result, recs, sweep, lines, peaked = dict(machine=machine, config=cfg), [], [], [], None
    ticks = cpu_ticks()
    if args.only in (None, "lottery"):
        compile_ = None if args.quick else measure_compile(args.dtype, threads)
        warm_up(dtype)
        print("numba compile of the sparse kernels: " + (
            f"cold {compile_['cold']:.2f} s, warm {compile_['warm']:.2f} s (fresh processes)" if compile_
            else "not measured with --quick"))
        print(f"Times: median (min-max) of {cfg['repeats']} runs of forward+backward after a checked "
              f"warm-up run;\nGF/s: useful FLOPs per second; check: worst relative error against "
              f"another backend.\n")
        print(HEADER)
        for name, spec, D, H, dh in cfg["workloads"]:
            recs.append(measure_workload(name, spec, D, H, dh, cfg, dtype, print_row))
        peaked = next((measure_peaked(r, dtype, cfg["repeats"]) for r in recs if r["name"] == "transformer"
                       and "times" in r["rows"]["dense"]), None)
        n, (D, H, dh) = cfg["n"], cfg["sweep_dims"]
        print(f"-- density sweep at N={n}, D/H/dh {D}/{H}/{dh}")
        for d in cfg["densities"]:
            spec = ("complete", n) if d == 1 else ("density", n, d)
            sweep.append(measure_workload("mid (5%)" if d == 0.05 else f"{100 * d:g}%", spec, D, H, dh,
                                          cfg, dtype, print_row))
        cross, memory = crossover(sweep), {}
        jobs = [(r, b) for r in recs for b in ("dense", "sparse") if "times" in r["rows"][b]
                and (cfg["memory"] == "all" or r["name"] in cfg["memory"])]
        if jobs:
            print("\npeak memory: RSS growth of a fresh process over one forward+backward")
        for r, b in jobs:
            m = memory[r["name"], b] = run_child(dict(task="memory", spec=r["graph"], D=r["D"], H=r["H"],
                                                      dh=r["dh"], backend=b, dtype=args.dtype, threads=threads))
            need = r["needs"][b]
            peak = (f"{m['peak_bytes'] / MiB:8.0f} MiB" + ("" if m["exact"] else " at most")
                    if "peak_bytes" in m else f" failed: {m['error']}")
            print(f"  {r['name']:<12} {b:<7}{peak}   (gtx.{b}_bytes predicts {need / MiB:,.0f} MiB)",
                  flush=True)
        lines += verdicts(recs, cross, n, memory)
        if peaked:
            lines.append(f"peaked attention (transformer, Wq and Wk x{peaked['scale']:g}): dense "
                         f"{fmt_ms(peaked['flushed'])} ms; {fmt_ms(peaked['kept'])} ms if denormals were kept")
        result.update(compile=compile_, workloads=recs, sweep=sweep, crossover=cross, peaked=peaked,
                      memory={f"{k[0]} {k[1]}": v for k, v in memory.items()})
        if args.plot or not args.quick:
            plot(args.plot or "bench-latest.png", recs, sweep, cross, n)
    if args.only in (None, "learn"):
        t0 = time.perf_counter()
        result["learn_seeds"] = runs = learn(cfg["learn"])
        result["learn"] = {arm: float(np.mean(v)) for arm, v in runs.items()}
        result["learn_s"] = time.perf_counter() - t0
        lines += learn_report(runs, result["learn_s"])
    if args.only in (None, "gpt"):
        result["gpt"] = gpt(cfg["gpt"], dtype)
        lines += gpt_report(result["gpt"])
    if args.only in (None, "molecules"):
        mode = cfg["molecules"]
        if args.full:
            mode = "full"
        result["molecules"] = molecules(mode, args.seeds, dtype)
        lines += molecules_report(result["molecules"], mode, args.seeds)
        mol_plot = args.mol_plot
        if args.full and mol_plot is None:
            mol_plot = "molecules.png"
        if mol_plot and result["molecules"] is not None:
            molecules_plot(mol_plot, result["molecules"])
    print()
    for line in lines:
        print(line)
    others = others_share(ticks, cpu_ticks())
    wall = time.perf_counter() - START
    print(f"\nwall time {wall:.0f} s; other programs took {others:.0%} of the CPUs"
          + ("\nWARNING: timings may be disturbed; rerun on a quiet machine" if others > 0.05 else ""))
    mismatch = [f"{r['name']}/{b}" for r in recs + sweep for b, row in r["rows"].items()
                if row.get("check") and row["check"]["err"] > TOL[args.dtype]]
    mismatch += ["peaked (denormals flushed vs kept)"] if peaked and peaked["err"] > TOL[args.dtype] else []
    if mismatch:
        print("!! BACKENDS DISAGREE on: " + ", ".join(mismatch))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result, verdicts=lines, others_cpu=others, wall_s=wall), f, indent=1, default=str)
        print(f"json written to {os.path.abspath(args.json)}")
    sys.exit(1 if mismatch else 0)


if __name__ == "__main__":
    main()
