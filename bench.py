#!/usr/bin/env python3
"""The hardware lottery, measured: gtx's dense, sparse and naive backends on this CPU.

A Transformer layer is graph attention on the complete graph. The dense backend does that
graph's N^2 work as BLAS matmuls at hundreds of GFLOP/s; the sparse backend does only the E
edges' work, but through per-edge loops that run far slower per FLOP. This script times both,
and the naive Python loop, on Transformer-like and sparse graphs, finds the density at which
dense and sparse cost the same, and measures the memory each one needs.

    python bench.py                 # the default run: at most about 3 minutes on 2 cores
    python bench.py --quick         # a tiny version that runs in seconds (tests and CI)
    python bench.py --dtype float64 --threads 1 --json out.json --plot out.png

Progress goes to stderr; the table and the verdict lines go to stdout.
"""
# Dimension letters: N nodes, E edges, H heads, dh head size, D model width.
import argparse
import ctypes
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import gtx

SEED = 0                                       # one seed for every graph, parameter and input
MiB, GiB = 2**20, 2**30
TOL = {"float32": 1e-4, "float64": 1e-10}      # worst max|a - b| / max|b| over y, dx and every gradient
REFERENCE = {"dense": ("sparse", "naive"), "sparse": ("dense", "naive"), "naive": ("sparse", "dense")}
START = time.perf_counter()


def config(quick):
    """Workloads and budgets. A workload is a graph spec plus the layer's D, H, dh; those that
    occur twice (transformer is also the size sweep's N=1024) are measured once."""
    def w(name, graph, D, H, dh):
        return dict(name=name, graph=graph, D=D, H=H, dh=dh)
    if quick:                                  # same code paths, tiny shapes
        cfg = dict(repeats=3, row_budget=2.0, check_budget=2.0, naive_max_edges=3000, settle_s=0.0,
                   dense_cap=32 * MiB,         # small enough that the sparse row exercises the skip path
                   memory_groups=("workloads",), threads_on=("sparse", "powerlaw"),
                   density_n=256, densities=(0.01, 0.05, 0.3, 1.0), density_dims=(32, 2, 16),
                   sizes=(32, 64, 128), size_dims=(32, 2, 16))
        named = [w("small", dict(kind="random", n=200, avg_degree=8), 16, 2, 8),
                 w("transformer", dict(kind="complete", n=128), 32, 2, 16),
                 w("mid", dict(kind="random", n=256, density=0.05), 32, 2, 16),
                 w("powerlaw", dict(kind="ba", n=1000, m=4), 16, 2, 8),
                 w("sparse", dict(kind="random", n=4000, avg_degree=8), 16, 2, 8)]
    else:
        cfg = dict(repeats=5, row_budget=12.0, check_budget=10.0, naive_max_edges=20_000, settle_s=0.2,
                   # never let dense touch more than this: the machine must stay usable
                   dense_cap=min(4 * GiB, gtx.available_bytes() // 2),
                   memory_groups=("workloads", "size sweep", "density sweep"), threads_on=("sparse", "powerlaw"),
                   density_n=2048, densities=(0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.3, 1.0),
                   density_dims=(128, 4, 32), sizes=(128, 256, 512, 1024, 2048, 4096), size_dims=(256, 4, 64))
        named = [w("small", dict(kind="random", n=1000, avg_degree=16), 64, 4, 16),
                 w("transformer", dict(kind="complete", n=1024), 256, 4, 64),
                 w("mid", dict(kind="random", n=2048, density=0.05), 128, 4, 32),
                 w("powerlaw", dict(kind="ba", n=10000, m=8), 64, 4, 16),
                 w("sparse", dict(kind="random", n=20000, avg_degree=16), 64, 4, 16)]
    cfg["quick"] = quick
    # Run order: small graphs first, so every larger one has a measured row to estimate from.
    dn = cfg["density_n"]
    sweeps = ([("size sweep", w(f"complete N={n}", dict(kind="complete", n=n), *cfg["size_dims"]))
               for n in cfg["sizes"]] +
              [("density sweep", w(f"density {fmt_pct(d)}", dict(kind="complete", n=dn) if d == 1 else
                                   dict(kind="random", n=dn, density=d), *cfg["density_dims"]))
               for d in cfg["densities"]])
    cases = {}
    for group, wl in [("workloads", named[0])] + sweeps + [("workloads", x) for x in named[1:]]:
        case = cases.setdefault(json.dumps([wl["graph"], wl["D"], wl["H"], wl["dh"]]), dict(wl, labels={}))
        case["labels"][group] = wl["name"]
    return cfg, list(cases.values())


# ---------------------------------------------------------------- graphs and inputs

def barabasi_albert(n, m, rng):
    """Preferential attachment: each new node t >= m links to m distinct earlier nodes, drawn with
    probability proportional to their degree; edges in both directions.

    Drawing uniformly from the list of all edge endpoints so far is drawing by degree, so one
    small vectorised draw per node suffices (redrawn only for the rare repeated pick)."""
    rng = np.random.default_rng(rng)
    ends = np.empty(2 * m * n, np.int64)         # endpoint list; the first newcomer links to nodes 0..m-1
    ends[:m], size = np.arange(m), m
    picks = np.empty((n - m, m), np.int64)       # picks[t - m]: the earlier nodes t links to
    for t in range(m, n):
        chosen = set()
        while len(chosen) < m:
            chosen.update(ends[rng.integers(0, size, m - len(chosen))].tolist())
        picks[t - m] = sorted(chosen)
        ends[size:size + m], ends[size + m:size + 2 * m] = picks[t - m], t
        size += 2 * m
    new = np.repeat(np.arange(m, n), m)
    old = picks.ravel()
    return gtx.Graph(np.stack([np.concatenate([old, new]), np.concatenate([new, old])]), n)


def build_graph(spec):
    if spec["kind"] == "complete":
        return gtx.complete_graph(spec["n"], self_loops=True)
    if spec["kind"] == "ba":
        return barabasi_albert(spec["n"], spec["m"], SEED)
    return gtx.random_graph(spec["n"], avg_degree=spec.get("avg_degree"), density=spec.get("density"), rng=SEED)


def tiny_case(dtype):
    """A 64-node graph and its inputs: first calls, before anything is timed or measured."""
    g = gtx.random_graph(64, avg_degree=4, rng=SEED)
    return (g, *make_inputs(g, 16, 2, 8, dtype))


def make_inputs(g, D, H, dh, dtype):
    rng = np.random.default_rng(SEED)
    params = gtx.init_params(D, H, dh, rng=rng, dtype=dtype)
    x = rng.standard_normal((g.num_nodes, D)).astype(dtype)
    dy = rng.standard_normal((g.num_nodes, D)).astype(dtype)
    return x, params, dy


# ---------------------------------------------------------------- measuring

def progress(msg):
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def apply_threads(n):
    """One thread count for BLAS (through threadpoolctl) and for Numba's prange."""
    threadpool_limits(n)
    numba.set_num_threads(n)


def cpu_ticks():
    """Clock ticks since boot: all CPUs busy, all CPUs in total, and this process (all its threads and
    the children it waited for) busy."""
    with open("/proc/stat") as f:
        t = [int(n) for n in f.readline().split()[1:]]
    own = sum(os.times()[:4])
    return sum(t) - t[3] - t[4], sum(t), own * os.sysconf("SC_CLK_TCK")


def others_share(t0, t1):
    """Share of all CPU time between two cpu_ticks() that other programs took: they disturb timings.
    Ticks are 10 ms, so less than 10 of them says nothing."""
    busy, total, own = (b - a for a, b in zip(t0, t1))
    return max(busy - own, 0) / total if busy - own >= 10 else 0.0


def run_once(backend, g, x, params, dy):
    """One forward and backward; returns y, dx and every parameter gradient."""
    y, cache = gtx.forward(x, g, params, backend=backend)
    dx, grads = gtx.backward(dy, cache)
    return dict(y=y, dx=dx, **grads)


def time_runs(backend, g, x, params, dy, repeats, settle_s):
    """Seconds per run of forward, backward and both; one clock brackets both calls of a run."""
    time.sleep(settle_s)    # idle OpenBLAS workers spin ~0.1 s after a call; let the previous row's stop first
    fwd, bwd, ticks = [], [], cpu_ticks()
    for _ in range(repeats):
        t0 = time.perf_counter()
        y, cache = gtx.forward(x, g, params, backend=backend)
        t1 = time.perf_counter()
        out = gtx.backward(dy, cache)
        t2 = time.perf_counter()
        del y, cache, out                      # freed before the next run, so runs never overlap in memory
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return dict(fwd=fwd, bwd=bwd, total=[a + b for a, b in zip(fwd, bwd)], others_cpu=others_share(ticks, cpu_ticks()))


def rel_err(out, ref):
    """Worst max|out - ref| / max|ref| over y, dx and the gradients. A bias gradient is scaled like its
    weight's: that of bk is exactly zero (softmax ignores a per-target shift of the scores), so
    what is left of it is round-off of the weight gradient's size."""
    def scale(k):
        return max(np.abs(ref[k]).max(), np.abs(ref["W" + k[1]]).max() if k[0] == "b" else 0,
                   np.finfo(ref[k].dtype).tiny)
    return max(float(np.abs(out[k] - ref[k]).max() / scale(k)) for k in ref)


def matmul_floor(N, D, H, dh, dtype, repeats):
    """Times the dense backend's matmuls alone, on its shapes and into preallocated outputs: the
    projections, per head Q K^T and P V, and the backward's matmuls. Nothing else is timed."""
    rng = np.random.default_rng(SEED)
    a = lambda *shape: rng.standard_normal(shape).astype(dtype)
    x, W, Wo, dy, o = a(N, D), a(D, 3 * H * dh), a(H * dh, D), a(N, D), a(N, H * dh)   # W: [Wq Wk Wv]
    q, k, v, do, P, dqkv = a(H, N, dh), a(H, N, dh), a(H, N, dh), a(H, N, dh), a(N, N), a(N, 3 * H * dh)
    fwd = [(x, W)] + [(q[h], k[h].T) for h in range(H)] + [(P, v[h]) for h in range(H)] + [(o, Wo)]
    bwd = ([(o.T, dy), (dy, Wo.T)] +                                      # dWo, do
           [m for h in range(H) for m in ((P.T, do[h]), (do[h], v[h].T), (P, k[h]), (P.T, q[h]))] +  # dv dP dq dk
           [(x.T, dqkv), (dqkv, W.T)])                                    # [dWq dWk dWv] and dx
    fwd = [(A, B, np.empty((A.shape[0], B.shape[1]), dtype)) for A, B in fwd]
    bwd = [(A, B, np.empty((A.shape[0], B.shape[1]), dtype)) for A, B in bwd]
    flops = sum(2 * A.shape[0] * A.shape[1] * B.shape[1] for A, B, _ in fwd + bwd)
    times = {"fwd": [], "bwd": []}
    for run in range(repeats + 1):             # run 0 is the warm-up
        for part, mms in (("fwd", fwd), ("bwd", bwd)):
            t0 = time.perf_counter()
            for A, B, C in mms:
                np.matmul(A, B, out=C)
            if run:
                times[part].append(time.perf_counter() - t0)
    times["total"] = [a + b for a, b in zip(times["fwd"], times["bwd"])]
    return dict(times=times, flops=flops)


def useful_flops(N, E, D, H, dh):
    """Multiply-adds x 2 of forward + backward with E edges: 12 (N, D) x (D, H dh)-sized matmuls and,
    per edge and head, 6 dot products or axpys of length dh (score, P V and four in the backward)."""
    return 24 * N * D * H * dh + 12 * E * H * dh


def keep_bytes(backend, N, E, H, dh, itemsize):
    """What must be kept for the backward: the attention matrix (dense: H N^2, else alpha E H)
    plus q, k, v and o, (N, H, dh) each."""
    return ((H * N * N if backend == "dense" else E * H) + 4 * N * H * dh) * itemsize


def predict(backend, case, cases):
    """Seconds per run and where that comes from: the largest measured run of this backend (same
    D, H, dh if there is one), scaled by work: N^2 H dh for dense, E H dh for sparse, E for naive."""
    def work(c):
        return {"dense": c["N"] ** 2 * c["H"] * c["dh"], "sparse": c["E"] * c["H"] * c["dh"], "naive": c["E"]}[backend]
    done = [c for c in cases if c.get("rows", {}).get(backend, {}).get("times")]
    same = [c for c in done if (c["D"], c["H"], c["dh"]) == (case["D"], case["H"], case["dh"])]
    if not done:
        return None, None
    ref = max(same or done, key=work)
    scale = work(case) / max(work(ref), 1)
    return total_s(ref["rows"][backend]) * scale, f"{ref['name']}'s time x {scale:.3g} (work ratio)"


def measure_case(case, cases, cfg, dtype, threads):
    """Validate, then time, every backend that fits; the others get a reason and an estimate."""
    g = build_graph(case["graph"])
    N, E, H = g.num_nodes, g.num_edges, case["H"]
    case.update(N=N, E=E, density=E / N**2, rows={})
    x, params, dy = make_inputs(g, case["D"], H, case["dh"], dtype)
    name = " / ".join(case["labels"].values())
    progress(f"{name}: N={N} E={E} built")

    case["dense_bytes"] = need = gtx.dense_bytes(g, H, dtype)

    def unaffordable(b, reference=False):
        """Why b may not run here (None if it may): to be timed, or just once as a reference."""
        if b == "dense" and need > cfg["dense_cap"]:
            return f"needs {fmt_bytes(need)} > {fmt_bytes(cfg['dense_cap'])} cap"
        if b == "naive" and E > cfg["naive_max_edges"] and not reference:
            return f"per-edge Python loop, E > {cfg['naive_max_edges']}"
        est, budget = predict(b, case, cases)[0], cfg["check_budget" if reference else "row_budget"]
        if reference and est is None:
            return "no measured run to estimate its cost from"
        if est is not None and est > budget:
            return f"~{est:.1f} s per run > {budget:.0f} s budget"
        return None

    outputs, first, first_others = {}, {}, {}
    for b in gtx.BACKENDS:
        row = case["rows"][b] = dict(backend=b)
        why = unaffordable(b)
        if why:
            est, source = predict(b, case, cases)
            row.update(status="skipped", note=why + (f"; estimate: {source}" if est else ""), estimate_s=est)
            progress(f"{name}: {b} skipped ({why})")
            continue
        if b == "dense" and not g.is_complete:
            g.dense_mask                                # built once per graph and cached, like the CSRs: untimed
        t0, ticks = time.perf_counter(), cpu_ticks()
        outputs[b] = run_once(b, g, x, params, dy)      # also the warm-up before timing
        first[b] = time.perf_counter() - t0
        first_others[b] = others_share(ticks, cpu_ticks())
        progress(f"{name}: {b} first run {first[b] * 1e3:.0f} ms")
    for b in first:                                     # validate, then time
        row = case["rows"][b]
        ref = next((r for r in REFERENCE[b] if r in outputs), None)
        if ref is None:                                 # run another backend only as the reference
            ref = next((r for r in REFERENCE[b] if not unaffordable(r, reference=True)), None)
            if ref is not None:
                progress(f"{name}: running {ref} once as the reference for {b}")
                outputs[ref] = run_once(ref, g, x, params, dy)
        if ref is None:
            row["check"] = dict(ok=None, ref=None)
            progress(f"{name}: {b} UNCHECKED: no other backend fits the budget")
        else:
            err = rel_err(outputs[b], outputs[ref])
            row["check"] = dict(ok=err <= TOL[dtype.__name__], ref=ref, err=err)
            if not row["check"]["ok"]:
                progress(f"!!! {name}: {b} DISAGREES with {ref}: relative error {err:.1e} > {TOL[dtype.__name__]:.0e} !!!")
        if first[b] * cfg["repeats"] > cfg["row_budget"]:
            row.update(status="one run", times=dict(fwd=[], bwd=[], total=[first[b]], others_cpu=first_others[b]),
                       note=f"{cfg['repeats']} runs would exceed the {cfg['row_budget']:.0f} s row budget")
            progress(f"{name}: {b} not timed further ({row['note']})")
            continue
        row.update(status="timed", times=time_runs(b, g, x, params, dy, cfg["repeats"], cfg["settle_s"]))
        progress(f"{name}: {b} timed, total median {np.median(row['times']['total']) * 1e3:.1f} ms")
    if "workloads" in case["labels"] and case["name"] in cfg["threads_on"] and "sparse" in first and threads > 1:
        with threadpool_limits(1):                      # the whole layer on one core, BLAS included
            numba.set_num_threads(1)
            try:
                time_runs("sparse", g, x, params, dy, 1, 0)   # warm-up at the new thread count
                case["rows"]["sparse 1 thread"] = dict(backend="sparse 1 thread", status="timed",
                                                       times=time_runs("sparse", g, x, params, dy, cfg["repeats"],
                                                                       cfg["settle_s"]),
                                                       note="BLAS and Numba on 1 thread")
            finally:
                numba.set_num_threads(threads)
        progress(f"{name}: sparse timed on 1 thread")


def stats(v):
    return dict(median=float(np.median(v)), min=float(np.min(v)), max=float(np.max(v))) if v else None


def run_child(task, env=None):
    """Runs this script's --child mode in a fresh Python process; returns its JSON answer."""
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(task)],
                       capture_output=True, text=True, env=env)
    if p.returncode:
        return dict(error=(p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1])
    return json.loads(p.stdout.splitlines()[-1])


def measure_compile(dtype, threads):
    """Numba compile cost of the sparse kernels, never inside a timing: the first call in a fresh
    process with an empty cache (cold), then in another fresh process that finds the cache the
    first one wrote (warm). Each subtracts that process's second, already-compiled call."""
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        return {state: run_child(dict(task="compile", dtype=dtype, threads=threads), env)
                for state in ("cold", "warm")}


def child(task):
    """The fresh process behind run_child: compile time, or the peak memory of one forward+backward."""
    dtype = np.dtype(task["dtype"]).type
    tiny, *tiny_in = tiny_case(dtype)
    if task["task"] == "compile":
        apply_threads(task["threads"])
        t = [time.perf_counter()]
        for _ in range(2):
            run_once("sparse", tiny, *tiny_in)
            t.append(time.perf_counter())
        return dict(first_s=t[1] - t[0], steady_s=t[2] - t[1], compile_s=(t[1] - t[0]) - (t[2] - t[1]))
    c = task["case"]
    g = build_graph(c["graph"])
    inputs = make_inputs(g, c["D"], c["H"], c["dh"], dtype)
    run_once(task["backend"], tiny, *tiny_in)   # load kernels, start thread pools, before the baseline
    apply_threads(task["threads"])
    # Building the inputs freed memory that malloc keeps resident; the call would reuse it unseen.
    # Hand it back to the OS first (glibc), so every page the call touches shows up in the RSS.
    ctypes.CDLL(None).malloc_trim(0)
    status = lambda key: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
    base = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                             # Linux: reset the RSS high-water mark (VmHWM) to now
    run_once(task["backend"], g, *inputs)
    return dict(peak_bytes=status("VmHWM:") - base, base_bytes=base)


def measure_memory(cases, cfg, dtype, threads):
    """Peak RSS growth above the inputs, in a fresh process per measurement, so every allocation
    counts, NumPy's and Numba's alike. Two at a time: nothing is being timed meanwhile."""
    jobs = [(c, b) for c in cases if set(c["labels"]) & set(cfg["memory_groups"])
            for b in gtx.BACKENDS if c["rows"][b]["status"] != "skipped"]
    progress(f"memory: {len(jobs)} fresh processes, two at a time")
    tasks = [dict(task="memory", case={k: c[k] for k in ("graph", "D", "H", "dh")}, backend=b,
                  dtype=dtype.__name__, threads=threads) for c, b in jobs]
    with ThreadPoolExecutor(2) as pool:
        for (c, b), res in zip(jobs, pool.map(run_child, tasks)):
            c["rows"][b]["memory"] = res
            progress(f"memory: {' / '.join(c['labels'].values())} {b}: "
                     + (f"{res['peak_bytes'] / MiB:.1f} MiB" if "peak_bytes" in res else f"FAILED: {res['error']}"))


def add_floors_and_rates(cases, cfg, dtype):
    """Per measured row: summary statistics, useful GFLOP/s and, for dense, its matmul floor."""
    floors = {}
    for case in cases:
        for b, row in case["rows"].items():
            if not row.get("times"):
                continue
            for k in ("fwd", "bwd", "total"):
                row[f"{k}_stats"] = stats(row["times"][k])
            row["gflops"] = useful_flops(case["N"], case["E"], case["D"], case["H"], case["dh"]) / total_s(row) / 1e9
            if b == "dense" and row["status"] == "timed":
                shape = (case["N"], case["D"], case["H"], case["dh"])
                if shape not in floors:
                    progress(f"matmul floor for N={shape[0]} D/H/dh={shape[1]}/{shape[2]}/{shape[3]}")
                    f = matmul_floor(*shape, dtype, cfg["repeats"])
                    floors[shape] = dict(f, **{k: stats(v) for k, v in f["times"].items()},
                                         gflops=f["flops"] / np.median(f["times"]["total"]) / 1e9)
                row["floor"] = floors[shape]
                row["floor_ratio"] = total_s(row) / row["floor"]["total"]["median"]


# ---------------------------------------------------------------- reporting

def fmt_t(s):
    ms = s * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def fmt_human_t(s):
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.1f} s"


def fmt_mib(b):
    return f"{b / MiB:.1f}" if b < 10 * MiB else f"{b / MiB:.0f}"


def fmt_ratio(r):
    return f"{r:.0f}x" if r >= 10 else f"{r:.1f}x"


def fmt_bytes(b):
    return f"{b / GiB:.1f} GiB" if b >= GiB else f"{fmt_mib(b)} MiB"


def fmt_count(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else str(n)


def fmt_pct(p):
    return f"{100 * p:.0f}%" if p >= 0.1 else f"{100 * p:.2g}%"


def total_s(row):
    return float(np.median(row["times"]["total"])) if row.get("times") else None


COLUMNS = [("workload", 16), ("backend", 15), ("N", 5), ("E", 6), ("density", 7), ("D/H/dh", 8), ("dtype", 7),
           ("fwd ms [min-max]", 19), ("bwd ms [min-max]", 19), ("total ms [min-max]", 19), ("GF/s", 5),
           ("x floor", 7), ("peak MiB", 8), ("keep MiB", 8), ("note", 0)]


def table_rows(case, label, dtype):
    item = np.dtype(dtype).itemsize
    for b, row in case["rows"].items():
        cell = {"workload": label, "backend": b, "N": case["N"], "E": fmt_count(case["E"]),
                "density": fmt_pct(case["density"]), "D/H/dh": f"{case['D']}/{case['H']}/{case['dh']}",
                "dtype": np.dtype(dtype).name}
        if row.get("times"):
            for part in ("fwd", "bwd", "total"):
                s = stats(row["times"][part])
                cell[f"{part} ms [min-max]"] = s and f"{fmt_t(s['median'])} [{fmt_t(s['min'])}-{fmt_t(s['max'])}]"
            cell["GF/s"] = f"{row['gflops']:.3g}"
            if row["status"] == "one run":
                cell["total ms [min-max]"] = f"{fmt_t(total_s(row))} (1 run)"
        elif row["status"] == "skipped":
            est = row.get("estimate_s")
            cell["total ms [min-max]"] = "skipped" + (f" ~{fmt_human_t(est)}" if est else "")
        if row.get("floor"):
            cell["x floor"] = f"{row['floor_ratio']:.1f}x"
        mem = row.get("memory")
        if mem:
            cell["peak MiB"] = fmt_mib(mem["peak_bytes"]) if "peak_bytes" in mem else "error"
        base_b = b.split()[0]
        cell["keep MiB"] = fmt_mib(keep_bytes(base_b, case["N"], case["E"], case["H"], case["dh"], item))
        check = row.get("check")
        notes = [row.get("note")] if row.get("note") else []
        if row.get("times", {}).get("others_cpu", 0) > 0.1:
            notes.append(f"DISTURBED: other programs took {row['times']['others_cpu']:.0%} of the CPUs")
        if check and check["ok"] is None:
            notes.append("UNCHECKED: no reference fits")
        elif check:
            notes.append(f"{'ok' if check['ok'] else '!! MISMATCH'} {check['err']:.0e} vs {check['ref']}")
        cell["note"] = "; ".join(notes)
        yield cell


def print_table(cases, dtype):
    line = lambda cells: " ".join(f"{str(cells.get(k) or ''):<{w}}" if w else str(cells.get(k) or '')
                                   for k, w in COLUMNS).rstrip()
    print(line({k: k for k, _ in COLUMNS}))
    for group in ("workloads", "size sweep", "density sweep"):
        print(f"-- {group}")
        for case in cases:
            if group in case["labels"]:
                for cell in table_rows(case, case["labels"][group], dtype):
                    print(line(cell))


def crossover(cases):
    """Density where sparse and dense cost the same: the first rise of sparse/dense through 1,
    interpolated linearly in log(density) and log(time ratio)."""
    pts = sorted((c["density"], total_s(c["rows"]["sparse"]) / total_s(c["rows"]["dense"]))
                 for c in cases if "density sweep" in c["labels"]
                 and total_s(c["rows"]["sparse"]) and total_s(c["rows"]["dense"]))
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if r0 < 1 <= r1:
            f = math.log(r0) / (math.log(r0) - math.log(r1))
            return dict(density=math.exp(math.log(d0) + f * (math.log(d1) - math.log(d0))), points=pts)
    return dict(density=None, points=pts)


def verdicts(cases, cross, speedups, cfg):
    by = {c["labels"]["workloads"]: c for c in cases if "workloads" in c["labels"]}
    out = []

    def t(c, b):
        row = c["rows"][b]
        if row.get("times"):
            return total_s(row), fmt_human_t(total_s(row)) + (" (1 run)" if row["status"] == "one run" else "")
        if row.get("estimate_s"):
            return row["estimate_s"], f"~{fmt_human_t(row['estimate_s'])} (estimated)"
        return None, "not measured"

    c = by["transformer"]
    (td, sd), (ts, ss), (_, sn) = t(c, "dense"), t(c, "sparse"), t(c, "naive")
    out.append(f"transformer (N={c['N']}, complete): dense {sd}; sparse {ss}"
               + ((f" ({fmt_ratio(ts / td)} slower)" if ts >= td else f" ({fmt_ratio(td / ts)} faster)")
                  if td and ts else "")
               + f"; naive {sn}")
    row = c["rows"]["dense"]
    if row.get("floor"):
        out.append(f"dense matmul floor on transformer: {fmt_human_t(row['floor']['total']['median'])} "
                   f"at {row['floor']['gflops']:.0f} GFLOP/s; the whole layer takes {row['floor_ratio']:.1f}x that")
    if cross["density"]:
        out.append(f"crossover at N={cfg['density_n']}: dense is faster above density {fmt_pct(cross['density'])}")
    elif cross["points"]:
        faster = "sparse" if cross["points"][-1][1] < 1 else "dense"
        out.append(f"no crossover at N={cfg['density_n']}: {faster} is faster at every density measured")
    for name in ("sparse", "powerlaw"):
        c = by[name]
        (ts, ss), (td, sd) = t(c, "sparse"), t(c, "dense")
        what = "sparse graph" if name == "sparse" else f"powerlaw graph (BA m={c['graph']['m']})"
        est = " (estimated)" if c["rows"]["dense"]["status"] == "skipped" else ""
        faster = (f"; sparse {fmt_ratio(td / ts)} faster than dense{est}" if td >= ts else
                  f"; dense {fmt_ratio(ts / td)} faster than sparse{est}") if ts and td else ""
        out.append(f"{what} (N={c['N']}, density {fmt_pct(c['density'])}): sparse {ss}; dense {sd}{faster}"
                   + (f" [{c['rows']['dense']['note']}]" if est else ""))
    if speedups:
        out.append("sparse speed-up from 1 to %d threads: " % speedups["threads"]
                   + ", ".join(f"{k} {v:.2f}x" for k, v in speedups["by_workload"].items())
                   + (" (--quick: shapes too small for threads to pay; run without it)" if cfg["quick"] else ""))
    for name in ("transformer", "sparse"):
        c = by[name]
        peak = {b: c["rows"][b].get("memory", {}).get("peak_bytes") for b in ("sparse", "dense")}
        dense = (f"dense peak {fmt_bytes(peak['dense'])}" if peak["dense"] else
                 f"dense would need {fmt_bytes(c['dense_bytes'])} (gtx.dense_bytes)")
        if peak["sparse"]:
            out.append(f"memory on {name} (N={c['N']}, E={fmt_count(c['E'])}): sparse peak "
                       f"{fmt_bytes(peak['sparse'])}, O(H E); {dense}, O(H N^2)")
    return out


def describe_machine(threads_now):
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    try:
        layer = numba.threading_layer()
    except ValueError:                          # only known once a parallel kernel has run
        layer = "not started"
    return dict(cpu=cpu, cores=os.cpu_count(), usable_cores=len(os.sched_getaffinity(0)),
                available_gib=round(gtx.available_bytes() / GiB, 1), python=platform.python_version(),
                numpy=np.__version__, numba=numba.__version__, platform=platform.platform(),
                blas=[dict(library=i["internal_api"], version=i.get("version"), threads=i["num_threads"],
                           threading_layer=i.get("threading_layer"), path=i["filepath"])
                      for i in threadpool_info() if i["user_api"] == "blas"],
                numba_threads=numba.get_num_threads(), numba_threading_layer=layer, threads=threads_now,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))


def plot(path, cases, cross, cfg, itemsize):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed (pip install matplotlib), so {path} was not written")
        return
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    style = {"dense": "o-", "sparse": "s-", "naive": "^-"}
    time_ms = lambda r, c: total_s(r) and 1e3 * total_s(r)
    peak_mib = lambda r, c: r.get("memory", {}).get("peak_bytes", 0) / MiB
    for col, (group, key, xlabel, scale) in enumerate([
            ("density sweep", "density", f"density E/N^2 (%), N={cfg['density_n']}", 100),
            ("size sweep", "N", "N (complete graph)", 1)]):
        for row, (value, ylabel) in enumerate([(time_ms, "forward+backward (ms)"),
                                               (peak_mib, "peak memory above inputs (MiB)")]):
            ax = axes[row, col]
            for b in gtx.BACKENDS:
                pts = sorted((scale * c[key], value(c["rows"][b], c)) for c in cases if group in c["labels"])
                pts = [(x, y) for x, y in pts if y]
                if pts:
                    ax.plot(*zip(*pts), style[b], label=b)
            if value is peak_mib:               # what each must keep: H N^2 against H E (equal on complete graphs)
                for b, ls in (("dense", ":"), ("sparse", "--")):
                    pts = sorted((scale * c[key], keep_bytes(b, c["N"], c["E"], c["H"], c["dh"], itemsize) / MiB)
                                 for c in cases if group in c["labels"])
                    ax.plot(*zip(*pts), ls, color="gray", label=f"{b} keeps (analytic)")
            if group == "density sweep" and value is time_ms and cross["density"]:
                ax.axvline(100 * cross["density"], color="gray", ls="-.",
                           label=f"crossover {fmt_pct(cross['density'])}")
            ax.set_xscale("log", base=10 if group == "density sweep" else 2)
            ax.set_yscale("log")
            ax.set(xlabel=xlabel, ylabel=ylabel)
            ax.legend(fontsize=8)
    fig.suptitle("gtx: dense (BLAS matmul) against sparse (per-edge Numba) attention, forward+backward")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    progress(f"plot written to {path}")


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and fewer repeats: runs in seconds")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--threads", type=int, help="threads for BLAS and Numba (default: as configured)")
    ap.add_argument("--json", metavar="PATH", help="write every raw figure and the machine description")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG: time vs density, time and memory vs N")
    ap.add_argument("--child", help=argparse.SUPPRESS)   # internal: the fresh process of run_child
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.threads is not None and not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        ap.error(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS)")
    threads = args.threads or numba.get_num_threads()
    dtype = np.dtype(args.dtype).type
    cfg, cases = config(args.quick)
    ticks = cpu_ticks()
    time.sleep(0.5)
    busy, run_ticks = others_share(ticks, cpu_ticks()), cpu_ticks()

    compile_ = None
    if not args.quick:                          # two fresh processes and a full compile: seconds, not for --quick
        compile_ = measure_compile(args.dtype, threads)
        progress("compile: " + ", ".join(f"{k} {v.get('compile_s', float('nan')):.2f} s" for k, v in compile_.items()))
    t0 = time.perf_counter()
    tiny = tiny_case(dtype)
    for b in gtx.BACKENDS:                      # first calls (Numba compile or cache load) happen here, untimed
        run_once(b, *tiny)
    first_calls = time.perf_counter() - t0
    apply_threads(threads)                      # now: the first calls load more BLAS (SciPy's, for Numba)
    progress(f"first calls of the three backends in this process: {first_calls:.2f} s")

    for case in cases:
        measure_case(case, cases, cfg, dtype, threads)
    measure_memory(cases, cfg, dtype, threads)

    add_floors_and_rates(cases, cfg, dtype)
    cross = crossover(cases)
    one = {c["name"]: c for c in cases if "sparse 1 thread" in c["rows"]}
    speedups = one and dict(threads=threads, by_workload={
        n: total_s(c["rows"]["sparse 1 thread"]) / total_s(c["rows"]["sparse"]) for n, c in one.items()})

    others = others_share(run_ticks, cpu_ticks())
    machine = dict(describe_machine(threads), others_cpu_before_start=busy, others_cpu_during_run=others)
    blas = ", ".join(f"{b['library']} {b['version']} in {os.path.basename(os.path.dirname(b['path']))}: "
                     f"{b['threads']} threads" for b in machine["blas"])
    print(f"gtx bench{' --quick' if args.quick else ''}: {machine['cpu']}, {machine['cores']} cores; "
          f"python {machine['python']}, numpy {machine['numpy']}, numba {machine['numba']}")
    print(f"threads: BLAS ({blas}); Numba {machine['numba_threads']} ({machine['numba_threading_layer']} layer, "
          f"OMP_WAIT_POLICY={machine['omp_wait_policy']}); around sparse, BLAS on 1 thread per Python thread. "
          f"dtype {args.dtype}. Times: median [min-max] of {cfg['repeats']} runs after a validated warm-up run.")
    print(f"other programs took {busy:.0%} of the CPUs just before this run and {others:.0%} during it"
          + ("; WARNING: timings may be disturbed, rerun on a quiet machine" if max(busy, others) > 0.05 else ""))
    if compile_:
        print("numba compile of the sparse kernels (first call minus second, fresh process): "
              + ", ".join(f"{k} {v['compile_s']:.2f} s" if "compile_s" in v else f"{k} failed: {v['error']}"
                          for k, v in compile_.items()))
    else:
        print(f"numba compile: not measured with --quick; first calls here took {first_calls:.2f} s")
    print("GF/s: useful FLOPs (projections + 12 E H dh) per second. x floor: total / the same matmuls alone.\n"
          "peak MiB: RSS growth of a fresh process over one forward+backward. keep MiB: what the backward needs,\n"
          "the attention matrix (dense H N^2, else alpha E H) + q, k, v, o.\n")
    print_table(cases, dtype)
    lines = verdicts(cases, cross, speedups, cfg)
    print()
    for v in lines:
        print(v)
    mismatches = [(c["name"], b) for c in cases for b, r in c["rows"].items() if r.get("check", {}).get("ok") is False]
    if mismatches:
        print("!! BACKENDS DISAGREE on: " + ", ".join(f"{n}/{b}" for n, b in mismatches))
    disturbed = [(c["name"], b) for c in cases for b, r in c["rows"].items()
                 if r.get("times", {}).get("others_cpu", 0) > 0.1]
    if disturbed:
        print(f"WARNING: other programs disturbed {len(disturbed)} rows (marked DISTURBED); rerun on a quiet machine")
    wall = time.perf_counter() - START
    print(f"\nwall time {wall:.0f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, config=dict(cfg, dtype=args.dtype, seed=SEED,
                                                        tolerance=TOL[args.dtype]),
                           compile=compile_, first_calls_s=first_calls, cases=cases, crossover=cross,
                           thread_speedup=speedups, verdicts=lines, mismatches=mismatches, wall_s=wall),
                      f, indent=1, default=str)
        progress(f"json written to {args.json}")
    if args.plot:
        plot(args.plot, cases, cross, cfg, np.dtype(dtype).itemsize)
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
