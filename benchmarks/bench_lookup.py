"""Bottleneck lookup throughput: nearest key per codebook for a batch of embeddings.

Compares, for each codebook shape C x K:

* ``dkvb-torch``   :class:`dkvb.DiscreteKeyValueBottleneck` ``lookup`` with ``search="torch"`` (batched
                   matmul distances, chunked so the N x C x K tensor never exists at once);
* ``dkvb-faiss``   the same module with ``search="faiss"`` (one ``IndexFlatL2`` per codebook, built per call);
* ``faiss-flat``   baseline: projection, then ``faiss.IndexFlatL2.search`` on C prebuilt indexes;
* ``torch-cdist``  baseline: projection, then ``torch.cdist`` + ``argmin`` over all codebooks at once;
* ``matmul``       reference: one plain square float32 matmul with the FLOPs of the search
                   (N x C x K x key_dim multiply-adds); the table's last column is each method's
                   time over this one's (goal for ``dkvb-torch``: <= 3).

Each run happens in a fresh process, so its peak memory is its own: ``ru_maxrss`` growth during
the timed lookups (CPU), ``tracemalloc`` peak (numpy/Python allocations) and
``torch.cuda.max_memory_allocated`` (CUDA). Keys are random (k-means is not what is timed).
Prints a table and writes JSON to ``results/benchmarks/``.

    python benchmarks/bench_lookup.py --quick
    python benchmarks/bench_lookup.py --embeddings 16384 --device cuda
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Sequence

SHAPES = {  # name: (C, K, key_dim, embedding dim)
    "64x256": (64, 256, 8, 1280),    # EfficientNet-Lite0 features, the offline experiments
    "256x4096": (256, 4096, 14, 512),  # CLIP ViT-B/32 features, the paper's CIFAR setting
}
METHODS = ("dkvb-torch", "dkvb-faiss", "faiss-flat", "torch-cdist", "matmul")


def _prepare(method: str, shape: str, n: int, device: str, seed: int) -> tuple[Callable[[], Any], Any]:
    """(lookup function returning (n, C) nearest-key indices, objects to keep alive while timing)."""
    import faiss
    import numpy as np
    import torch

    from dkvb import DiscreteKeyValueBottleneck

    c, k, key_dim, dim = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    search = "faiss" if method == "dkvb-faiss" else "torch"
    b = DiscreteKeyValueBottleneck(dim, c, k, key_dim=key_dim, value_dim=10, search=search, seed=seed)
    b.keys.copy_(torch.randn(c, k, key_dim, generator=g) / 2)
    b.initted.fill_(True)
    x = torch.randn(n, dim, generator=g)
    on = torch.device(device)
    if method.startswith("dkvb"):
        b.to(on if method == "dkvb-torch" else "cpu")
        xd = x.to(on if method == "dkvb-torch" else "cpu")
        return lambda: b.lookup(xd)[:, :, 0], b
    if method == "faiss-flat":
        keys = b.keys.numpy()
        indexes = []
        for i in range(c):
            index = faiss.IndexFlatL2(key_dim)
            index.add(np.ascontiguousarray(keys[i]))
            indexes.append(index)
        proj = b.projection

        def faiss_flat() -> Any:
            z = torch.einsum("nd,dck->cnk", x, proj).numpy()
            out = np.empty((c, n), dtype=np.int64)
            for i, index in enumerate(indexes):
                out[i] = index.search(np.ascontiguousarray(z[i]), 1)[1][:, 0]
            return torch.from_numpy(out.T)

        return faiss_flat, indexes
    if method == "matmul":
        side = round((n * c * k * key_dim) ** (1 / 3))
        a, bm = torch.randn(side, side, generator=g).to(on), torch.randn(side, side, generator=g).to(on)
        return (lambda: (a @ bm)[: min(n, side), :c].long()), (a, bm)
    if method == "torch-cdist":
        keys, proj, xd = b.keys.to(on), b.projection.to(on), x.to(on)

        def cdist() -> Any:
            z = torch.einsum("nd,dck->cnk", xd, proj)
            return torch.cdist(z, keys).argmin(-1).T

        return cdist, None
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def _flops(method: str, shape: str, n: int) -> float:
    """Multiply-adds of one run: the search's N x C x K x key_dim, or the reference matmul's side^3."""
    c, k, key_dim, _ = SHAPES[shape]
    if method == "matmul":
        return round((n * c * k * key_dim) ** (1 / 3)) ** 3
    return n * c * k * key_dim


def embeddings_for(shape: str, args: argparse.Namespace) -> int:
    """``--embeddings``, capped so one lookup batch touches at most ``--max-distances`` (row, key) pairs."""
    c, k, _, _ = SHAPES[shape]
    return max(16, min(args.embeddings, args.max_distances // (c * k)))


def _worker(method: str, shape: str, n: int, device: str, repeats: int, threads: int | None, seed: int,
            queue: "mp.Queue") -> None:
    try:
        import torch

        if threads:
            import faiss

            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
        fn, keep = _prepare(method, shape, n, device, seed)
        cuda = device.startswith("cuda")
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() if cuda else 0
        # ru_maxrss is a high-water mark: take it after setup and before the first lookup, so the
        # growth is the peak working memory of the lookups (warm-up included) beyond inputs and keys.
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        fn()  # warm-up
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            idx = fn()
            sync()
            times.append(time.perf_counter() - start)
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        queue.put({
            "method": method, "shape": shape, "embeddings": n, "device": device, "threads": torch.get_num_threads(),
            "seconds": times, "embeddings_per_s": n / min(times),
            "median_embeddings_per_s": n / statistics.median(times),
            "gflops_per_s": _flops(method, shape, n) / min(times) / 1e9,
            "peak_rss_growth_mib": (rss_after - rss_before) / 1024,  # ru_maxrss is in KiB on Linux
            "tracemalloc_peak_mib": traced_peak / 2**20,
            "cuda_peak_mib": (torch.cuda.max_memory_allocated() - base_cuda) / 2**20 if cuda else None,
            "indices": idx.cpu().numpy()[:256].tolist(),
        })
        del keep
    except Exception as exc:  # report, don't hang the parent
        queue.put({"method": method, "shape": shape, "error": f"{type(exc).__name__}: {exc}"})


def run_one(method: str, shape: str, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(method, shape, embeddings_for(shape, args), args.device, args.repeats,
                                             args.threads, args.seed, queue))
    proc.start()
    try:
        result = queue.get(timeout=args.timeout)
    except Exception:
        proc.kill()
        result = {"method": method, "shape": shape, "error": f"no result within {args.timeout}s"}
    proc.join()
    return result


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| C x K | method | batch | embeddings/s | GFLOP/s | speed vs first | peak RSS growth MiB | tracemalloc MiB | "
             "CUDA MiB | same indices as first | time ÷ matmul of the same FLOPs |", "|" + "---|" * 11]
    ref = {r["shape"]: r["gflops_per_s"] for r in rows if r.get("method") == "matmul" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['method']} | | error: {r['error']} | | | | | | | |")
            continue
        cuda = f"{r['cuda_peak_mib']:.1f}" if r["cuda_peak_mib"] is not None else "-"
        ratio = f"{ref[r['shape']] / r['gflops_per_s']:.2f}" if r["shape"] in ref else ""
        r["time_over_matmul"] = float(ratio) if ratio else None
        lines.append(f"| {r['shape']} | {r['method']} | {r['embeddings']} | {r['embeddings_per_s']:,.0f} | "
                     f"{r['gflops_per_s']:.1f} | {r['speedup']:.2f} | "
                     f"{r['peak_rss_growth_mib']:.1f} | {r['tracemalloc_peak_mib']:.1f} | {cuda} | "
                     f"{'-' if r['agreement'] is None else format(r['agreement'], '.1%')} | {ratio} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--embeddings", type=int, default=8192, help="embeddings per lookup batch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu or cuda (faiss-cpu methods always run on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch and faiss CPU threads (default: their choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before it is abandoned")
    p.add_argument("--max-distances", type=float, default=2**30,
                   help="cap on embeddings x C x K per batch (the cdist baseline holds them all in memory)")
    p.add_argument("--quick", action="store_true", help="at most 1024 embeddings and 2^28 distances, 2 repeats")
    p.add_argument("--out", default="results/benchmarks/lookup.json")
    args = p.parse_args(argv)
    if args.quick:
        args.embeddings, args.repeats = min(args.embeddings, 1024), min(args.repeats, 2)
        args.max_distances = min(args.max_distances, 2**28)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.max_distances = int(args.max_distances)
    rows = []
    for shape in args.shapes:
        ref: dict[str, Any] | None = None
        for method in args.methods:
            r = run_one(method, shape, args)
            if "error" not in r:
                a = r.pop("indices")
                if ref is None:
                    ref = {"rate": r["embeddings_per_s"], "indices": a}
                r["speedup"] = r["embeddings_per_s"] / ref["rate"]
                # Nearest-key agreement on the first 256 embeddings (ties may differ in the last bit).
                pairs = [(x, y) for ra, rb in zip(a, ref["indices"]) for x, y in zip(ra, rb)]
                r["agreement"] = (None if method == "matmul"
                                  else sum(x == y for x, y in pairs) / max(1, len(pairs)))
            rows.append(r)
            status = r.get("error") or f"{r['embeddings_per_s']:,.0f} embeddings/s"
            print(f"  {shape} {method} ({embeddings_for(shape, args)} embeddings): {status}", file=sys.stderr)
    print(table(rows))
    out = Path(args.out)
    from dkvb.io import atomic_write_json

    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "load_avg_1min": os.getloadavg()[0]}
    atomic_write_json(out, {"benchmark": "lookup", "environment": env, "shapes": {k: dict(zip(
        ("num_codebooks", "codebook_size", "key_dim", "dim"), v)) for k, v in SHAPES.items()}, "runs": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
