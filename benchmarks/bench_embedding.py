"""Embedding throughput: the full cache path against the encoder's forward pass alone.

The full path is what ``dkvb embed`` runs: dataset -> PIL decode -> ``encoder.preprocess`` ->
DataLoader -> encoder -> float32/16 chunk files (:func:`dkvb.cache.encode_dataset`). The
reference is ``encoder.encode`` on the same batches, already preprocessed and on the device.
Their ratio is the overhead of data loading and caching (goal: <= 1.5). Prints a table and
writes JSON to ``results/benchmarks/``.

    python benchmarks/bench_embedding.py --quick                      # ~1 min on 2 CPU cores
    python benchmarks/bench_embedding.py --dataset fashion-mnist --images 2048 --image-size 64
    python benchmarks/bench_embedding.py --device cuda --amp bf16 --num-workers 8 --batch-size 256
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader

from dkvb.cache import _AMP, encode_dataset, subset_indices
from dkvb.datasets import load_dataset
from dkvb.encoders import create_encoder
from dkvb.io import atomic_write_json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def bench(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    encoder = create_encoder(args.encoder, image_size=args.image_size, device=device,
                             pretrained=not args.random_weights)
    dataset = load_dataset(args.dataset, args.split, transform=encoder.preprocess)
    indices = subset_indices(len(dataset), args.images, args.seed)
    n = len(indices)
    batches = [indices[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
    if device.type == "cuda":
        encoder.to(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast(device.type, dtype=_AMP[args.amp])) if args.amp else nullcontext

    # Reference input: the same batches, preprocessed once and moved to the device up front.
    loader = DataLoader(dataset, batch_sampler=[b.tolist() for b in batches], num_workers=0)
    inputs = [images.to(device) for images, _ in loader]
    if device.type == "cuda":
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]

    def forward_only() -> None:
        for x in inputs:
            with autocast():
                encoder.encode(x).cpu()

    def full_path() -> None:
        with tempfile.TemporaryDirectory(prefix="bench-embed-") as folder:
            encode_dataset(encoder, dataset, folder, indices, batch_size=args.batch_size,
                           num_workers=args.num_workers, dtype=args.dtype, amp=args.amp, progress=False)

    forward_only()  # warm-up: kernels, allocator, first-call overheads
    # Interleave the two measurements so a noisy neighbour hurts both alike.
    fwd, full = [], []
    for _ in range(args.repeats):
        fwd.append(_timed(forward_only, device))
        full.append(_timed(full_path, device))
    best_fwd, best_full = min(fwd), min(full)
    return {
        "encoder": encoder.name, "pretrained": encoder.pretrained, "image_size": encoder.image_size,
        "dataset": args.dataset, "images": n, "batch_size": args.batch_size, "num_workers": args.num_workers,
        "device": str(device), "amp": args.amp, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "forward_seconds": fwd, "full_seconds": full,
        "forward_images_per_s": n / best_fwd, "full_images_per_s": n / best_full,
        "ratio_full_over_forward": best_full / best_fwd,
        "median_ratio": statistics.median(f / w for f, w in zip(full, fwd)),
    }


def environment(device: str) -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "platform": platform.platform(), "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def table(rows: list[dict[str, Any]]) -> str:
    head = "| encoder | px | device | amp | workers | images | forward img/s | full path img/s | ratio (goal <= 1.5) |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['encoder']} | {r['image_size']} | {r['device']} | {r['amp'] or '-'} | {r['num_workers']} | "
                     f"{r['images']} | {r['forward_images_per_s']:.1f} | {r['full_images_per_s']:.1f} | "
                     f"{r['ratio_full_over_forward']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", default="effnet-lite0")
    p.add_argument("--dataset", default="fashion-mnist", help="any dkvb dataset name (synthetic: no files needed)")
    p.add_argument("--split", default="train", help="dataset split to encode")
    p.add_argument("--image-size", type=int, nargs="+", default=[64], help="one run per size")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=sorted(_AMP), default=None)
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--random-weights", action="store_true", help="pretrained=False (encoders needing a download)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="256 images, 2 repeats")
    p.add_argument("--out", default="results/benchmarks/embedding.json")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats = min(args.images, 256), min(args.repeats, 2)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    sizes = args.image_size
    rows = []
    for size in sizes:
        args.image_size = size
        rows.append(bench(args))
        print(f"  {rows[-1]['encoder']} @ {size}px: ratio {rows[-1]['ratio_full_over_forward']:.2f}", file=sys.stderr)
    print(table(rows))
    out = Path(args.out)
    atomic_write_json(out, {"benchmark": "embedding", "environment": environment(args.device), "runs": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
