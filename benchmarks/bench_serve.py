"""HTTP serving benchmark: a real ``dkvb serve`` process on 127.0.0.1 driven by httpx async clients.

Trains (or loads from its run folder) the DKVB of ``--config`` (default: Fashion-MNIST with
EfficientNet-Lite0 embeddings), then, each on a fresh copy of its store and a fresh server:

* predict phases: ``--clients`` concurrent clients send 1-row JSON, 256-row JSON and 256-row
  ``.npy`` requests (test-set embeddings, 6 decimals in JSON) while one client sends ``--forgets``
  forget requests over HTTP (a restore to the origin after every 5 forgotten classes, so no request
  is a no-op); every phase is bounded by a request count and ``--phase-seconds``;
* every prediction's version is checked against the verified audit log: it must be the version of
  a record committed no earlier than the last write answered before the prediction was sent and no
  later than the last write sent before it was answered (else it counts as stale or ahead);
* crash phase: ``--crashes`` times, the server is killed with SIGKILL at a random moment of a
  forget request, restarted, and must serve the version the log names with a replay that matches.

Prints a table and writes JSON (``--out``). Everything binds to 127.0.0.1.

    python benchmarks/bench_serve.py                                   # Fashion-MNIST
    python benchmarks/bench_serve.py experiments/digits_effnet_lite0.yaml --out /tmp/serve_digits.json
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import httpx
import numpy as np
import torch

from dkvb.audit import read_log
from dkvb.io import atomic_write_json
from dkvb.service import replay
from dkvb.store import served_version

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token-" + "0" * 20
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Server:
    """``dkvb serve`` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, store: Path, threads: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DKVB_SERVE_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dkvb", "--threads", str(threads), "serve", "--model", str(store), "--host",
             "127.0.0.1", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            cwd=ROOT)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        if not line or "http://" not in line[0]:
            self.proc.kill()
            raise RuntimeError(f"dkvb serve did not start: {line} {self.proc.stderr.read()[-2000:]}")
        self.url = line[0].split(" on ")[1].split()[0]
        self.start_seconds = time.perf_counter() - self.started

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of ``values``, ``None`` when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


def json_body(x: np.ndarray) -> bytes:
    return json.dumps({"embeddings": np.round(x.astype(np.float64), 6).tolist()}).encode()


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.astype(np.float32))
    return buf.getvalue()


async def writer(client: httpx.AsyncClient, class_names: list[str], forgets: int, gap: float,
                 log: list[dict[str, Any]], rng: random.Random) -> None:
    """``forgets`` forget requests (restoring to the origin after every 5 classes, or fewer where the
    model has fewer, so no request is a no-op or forgets every class), ``gap`` s apart."""
    order = class_names[:]
    rng.shuffle(order)
    per_round = min(5, len(order) - 1)
    done, k = 0, 0
    while done < forgets:
        if k and k % per_round == 0:
            await _write(client, "/restore", {"to": "origin"}, "restore", log)
        await _write(client, "/forget", {"classes": [order[(k // per_round * per_round + k % per_round) % len(order)]]},
                     "forget", log)
        done, k = done + 1, k + 1
        await asyncio.sleep(gap)


async def _write(client: httpx.AsyncClient, path: str, body: dict, kind: str, log: list[dict[str, Any]]) -> None:
    sent = time.perf_counter()
    r = await client.post(path, json=body, headers=AUTH)
    got = time.perf_counter()
    entry = {"kind": kind, "sent": sent, "got": got, "status": r.status_code}
    if r.status_code == 200:
        entry["request_id"] = r.json()["record"]["request_id"]
        entry["version"] = r.json()["version"]
    else:
        entry["detail"] = r.text[:300]
    log.append(entry)


async def predictor(client: httpx.AsyncClient, kind: str, bodies: list[bytes], stop: dict[str, Any],
                    out: list[dict[str, Any]]) -> None:
    """Send predictions until ``stop`` says so (the writer is done, the count or the time is up)."""
    i = 0
    while not stop["now"]():
        body = bodies[i % len(bodies)]
        i += 1
        sent = time.perf_counter()
        if kind == "npy":
            r = await client.post("/predict/npy", files={"file": ("x.npy", body, "application/octet-stream")})
        else:
            r = await client.post("/predict", content=body, headers={"content-type": "application/json"})
        got = time.perf_counter()
        out.append({"sent": sent, "got": got, "status": r.status_code,
                    "version": r.json().get("version") if r.status_code == 200 else None,
                    "detail": None if r.status_code == 200 else r.text[:300]})


def check_versions(predictions: list[dict[str, Any]], writes: list[dict[str, Any]],
                   records: list[dict[str, Any]]) -> dict[str, int]:
    """Count predictions naming a version the log does not reach, or one outside the window of
    records that could be served while the prediction was in flight."""
    index = {r["request_id"]: i for i, r in enumerate(records)}
    by_version: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_version.setdefault(r["version_after"], []).append(i)
    committed = [(w["sent"], w["got"], index[w["request_id"]]) for w in writes if w.get("request_id") in index]
    first = 0 if records else -1
    unlogged = stale = 0
    for p in predictions:
        if p["status"] != 200:
            continue
        ids = by_version.get(p["version"])
        if not ids:
            unlogged += 1
            continue
        lo = max([i for s, g, i in committed if g < p["sent"]], default=first)
        hi = max([i for s, g, i in committed if s < p["got"]], default=first)
        hi = max(hi, lo)
        if not any(lo <= i <= hi for i in ids):
            stale += 1
    return {"unlogged_versions": unlogged, "stale_or_ahead_versions": stale}


async def phase(url: str, kind: str, bodies: list[bytes], rows: int, class_names: list[str], args: argparse.Namespace,
                max_requests: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    limits = httpx.Limits(max_connections=args.clients + 2, max_keepalive_connections=args.clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for body in bodies[:3]:  # warm-up, not timed (no bodies: a phase of writes alone)
            await (client.post("/predict/npy", files={"file": ("x.npy", body)}) if kind == "npy" else
                   client.post("/predict", content=body, headers={"content-type": "application/json"}))
        predictions: list[dict[str, Any]] = []
        writes: list[dict[str, Any]] = []
        start = time.perf_counter()
        write_task = asyncio.create_task(writer(client, class_names, args.forgets, args.forget_gap, writes,
                                                random.Random(args.seed)))
        stop = {"now": lambda: (write_task.done() and len(predictions) >= args.min_requests)
                or len(predictions) >= max_requests or time.perf_counter() - start > args.phase_seconds}
        if bodies:
            await asyncio.gather(*[predictor(client, kind, bodies, stop, predictions) for _ in range(args.clients)])
        try:  # the writes finish (bounded by the phase's time) even when the predictions' count ran out first
            await asyncio.wait_for(write_task, timeout=max(1.0, args.phase_seconds - (time.perf_counter() - start)))
        except asyncio.TimeoutError:
            pass
        elapsed = time.perf_counter() - start
    return predictions, writes, elapsed


def summarize(kind: str, rows: int, predictions: list[dict[str, Any]], writes: list[dict[str, Any]], elapsed: float,
              records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [1e3 * (p["got"] - p["sent"]) for p in predictions if p["status"] == 200]
    fg = [1e3 * (w["got"] - w["sent"]) for w in writes if w["kind"] == "forget" and w["status"] == 200]
    rs = [1e3 * (w["got"] - w["sent"]) for w in writes if w["kind"] == "restore" and w["status"] == 200]
    errors = [p["detail"] for p in predictions if p["status"] != 200] + [w["detail"] for w in writes
                                                                         if w["status"] != 200]
    return {
        "payload": kind, "rows": rows, "requests": len(predictions), "seconds": elapsed,
        "requests_per_s": len(predictions) / elapsed if predictions else None,
        "rows_per_s": rows * len(ok) / elapsed if predictions else None,
        "p50_ms": pct(ok, 0.5), "p99_ms": pct(ok, 0.99), "max_ms": max(ok) if ok else None,
        "forgets": len(fg), "restores": len(rs), "forget_p50_ms": pct(fg, 0.5), "forget_p99_ms": pct(fg, 0.99),
        "forget_max_ms": max(fg) if fg else None, "forget_ms": fg, "restore_p50_ms": pct(rs, 0.5),
        "errors": len(errors), "error_examples": errors[:3], **check_versions(predictions, writes, records),
    }


def crashes(pristine: Path, work: Path, args: argparse.Namespace, class_names: list[str]) -> dict[str, Any]:
    """Kill -9 the server during a forget ``args.crashes`` times; each restart must serve the logged version."""
    path = work / "crash"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(pristine, path)
    rng = random.Random(args.seed)
    rounds, starts = [], []
    srv = Server(path, args.threads)
    starts.append(srv.start_seconds)
    try:
        for r in range(args.crashes):
            before = len(read_log(path)) if (path / "audit.jsonl").exists() else 0
            cls = class_names[r % (len(class_names) - 1)]
            delay = rng.uniform(0.0, args.kill_window)

            def post() -> None:
                try:
                    httpx.post(srv.url + "/forget", json={"classes": [cls]}, headers=AUTH, timeout=30)
                except httpx.HTTPError:
                    pass

            sender = threading.Thread(target=post, daemon=True)
            sender.start()
            time.sleep(delay)
            srv.kill()
            sender.join(30)
            srv = Server(path, args.threads)
            starts.append(srv.start_seconds)
            logged = served_version(path)
            health = httpx.get(srv.url + "/health", timeout=30).json()
            verify = httpx.get(srv.url + "/verify", headers=AUTH, timeout=60).json()
            replay_error = None
            if (path / "audit.jsonl").exists():
                try:
                    replay(path)
                except Exception as e:  # noqa: BLE001 - counted as a failure below
                    replay_error = f"{type(e).__name__}: {e}"
            after = len(read_log(path)) if (path / "audit.jsonl").exists() else 0
            # the next write is a forget (it takes over the request id a killed forget may have left on
            # an unlogged version), then a restore to the origin so the next round forgets again
            nxt = httpx.post(srv.url + "/forget", json={"classes": [class_names[-1]]}, headers=AUTH, timeout=30)
            reset = httpx.post(srv.url + "/restore", json={"to": "origin"}, headers=AUTH, timeout=30)
            rounds.append({"kill_after_ms": 1e3 * delay, "committed": after > before, "served": health["version"],
                           "logged": logged, "serves_logged": health["version"] == logged,
                           "verify_matches": bool(verify["matches"] and verify["served_matches_log"]),
                           "replay_matches": replay_error is None, "replay_error": replay_error, "next_write_status": max(nxt.status_code, reset.status_code)})
    finally:
        srv.stop()
    return {"rounds": len(rounds), "committed_before_kill": sum(r["committed"] for r in rounds),
            "served_logged_version": sum(r["serves_logged"] for r in rounds),
            "verify_matched": sum(r["verify_matches"] for r in rounds),
            "replay_matched": sum(r["replay_matches"] for r in rounds),
            "next_write_ok": sum(r["next_write_status"] == 200 for r in rounds),
            "restart_seconds_median": statistics.median(starts), "details": rounds}


def build_store(args: argparse.Namespace) -> tuple[Path, dict[str, Any], np.ndarray, list[str]]:
    """(the trained DKVB's store, description, test embeddings, class names)."""
    from dkvb.config import load_config
    from dkvb.experiment import load_embeddings, train_models
    from dkvb.store import load_model, save_model

    cfg = load_config(args.config, [f"output_dir={args.workdir / 'runs'}", *args.overrides])
    train, test = load_embeddings(cfg, progress=False)
    start = time.perf_counter()
    train_models(cfg, train, kinds={"dkvb"}, progress=False)
    trained = time.perf_counter() - start
    store = cfg.run_dir / "models" / "dkvb"
    model, manifest = load_model(store)
    if not model.activation_counts.numel():  # forget requests over HTTP read no embeddings: cache the counts
        model.compute_activation_counts(train.x, train.y)
        store = args.workdir / "pristine"
        shutil.rmtree(store, ignore_errors=True)
        save_model(model, store, class_names=list(manifest["class_names"]), encoder=manifest["encoder"],
                   encoder_config=manifest.get("encoder_config"))
    b = model.bottleneck
    desc = {"config": str(args.config), "name": cfg.name, "train_rows": len(train), "test_rows": len(test),
            "embedding_dim": train.dim, "classes": model.num_classes, "codebooks": b.num_codebooks,
            "keys_per_codebook": b.codebook_size, "topk": model.model_config.topk,
            "train_or_load_seconds": trained, "cached_activation_counts": bool(model.activation_counts.numel())}
    return store, desc, test.x.numpy(), list(manifest["class_names"])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", type=Path, default=ROOT / "experiments/fashion_mnist_effnet_lite0.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", type=Path, default=ROOT / "results/benchmarks/serve")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_fashion_mnist.json")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--forgets", type=int, default=20)
    p.add_argument("--forget-gap", type=float, default=0.1, help="seconds between write requests")
    p.add_argument("--min-requests", type=int, default=100, help="predictions per phase at least (if time allows)")
    p.add_argument("--max-requests", type=int, default=3000, help="predictions per phase at most")
    p.add_argument("--phase-seconds", type=float, default=60.0, help="time limit of each phase")
    p.add_argument("--crashes", type=int, default=20)
    p.add_argument("--kill-window", type=float, default=0.3, help="kill within this many seconds of sending")
    p.add_argument("--phases", type=lambda v: [n for n in v.split(",") if n], default=["writes", "json1", "json256", "npy256"],
                   help="comma-separated: writes (forgets alone), json1, json256, npy256")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    store, desc, test_x, class_names = build_store(args)
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    one = [json_body(test_x[i:i + 1]) for i in rng.choice(len(test_x), min(64, len(test_x)), replace=False)]
    big = [test_x[rng.choice(len(test_x), 256, replace=len(test_x) < 256)] for _ in range(8)]
    phases = {"writes": ("none", 0, [], 0), "json1": ("json", 1, one, args.max_requests),
              "json256": ("json", 256, [json_body(x) for x in big], args.max_requests // 4),
              "npy256": ("npy", 256, [npy_bytes(x) for x in big], args.max_requests // 4)}
    unknown = set(args.phases) - set(phases)
    if unknown:
        p.error(f"--phases: unknown {sorted(unknown)}; choose from {list(phases)}")
    results = []
    for kind, rows, bodies, cap in (phases[name] for name in args.phases):
        path = args.workdir / f"store-{kind}-{rows}"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(store, path)
        srv = Server(path, args.threads)
        load = os.getloadavg()[0]
        try:
            predictions, writes, elapsed = asyncio.run(phase(srv.url, kind, bodies, rows, class_names, args, cap))
        finally:
            srv.stop()
        row = summarize(kind, rows, predictions, writes, elapsed, read_log(path))
        row["load_avg_1min"] = [load, os.getloadavg()[0]]  # at the start and the end of the phase
        row["server_start_seconds"] = srv.start_seconds
        if (path / "audit.jsonl").exists():
            replay(path)  # raises unless the log replays to the served mask
        row["replay_matches"] = True
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "forget_ms"}), flush=True)
    crash = crashes(store, args.workdir, args, class_names)
    print(json.dumps({k: v for k, v in crash.items() if k != "details"}), flush=True)
    all_forgets = [ms for r in results if r["rows"] for ms in r["forget_ms"]]  # those under prediction load
    alone = next((r for r in results if not r["rows"]), {})
    big_json = next((r for r in results if r["payload"] == "json" and r["rows"] == 256), {})
    big_npy = next((r for r in results if r["payload"] == "npy"), {})

    def at_most(value: float | None, limit: float) -> dict[str, Any]:
        return {"measured": value, "met": value is not None and value <= limit}

    targets = {
        "forget_p99_ms<=50 (under prediction load)": at_most(pct(all_forgets, 0.99), 50),
        "forget_p99_ms<=50 (writes alone)": at_most(alone.get("forget_p99_ms"), 50),
        "predict_256_p99_ms<=50 (json)": at_most(big_json.get("p99_ms"), 50),
        "predict_256_p99_ms<=50 (npy)": at_most(big_npy.get("p99_ms"), 50),
        "errors==0": {"measured": sum(r["errors"] for r in results), "met": all(r["errors"] == 0 for r in results)},
        "versions_not_reached_by_log==0": {"measured": sum(r["unlogged_versions"] + r["stale_or_ahead_versions"]
                                                           for r in results),
                                           "met": all(r["unlogged_versions"] + r["stale_or_ahead_versions"] == 0
                                                      for r in results)},
        "crash_restarts_serving_logged_version": {"measured": f"{crash['served_logged_version']}/{crash['rounds']}",
                                                  "met": crash["served_logged_version"] == crash["rounds"]
                                                  and crash["replay_matched"] == crash["rounds"]},
    }
    print("\n| payload | rows | clients | requests | req/s | rows/s | p50 ms | p99 ms | forgets | forget p50 ms | "
          "forget p99 ms | errors | stale/unlogged versions |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if not r["rows"]:
            print(f"| (writes alone) | - | - | - | - | - | - | - | {r['forgets']} | {r['forget_p50_ms']:.1f} | "
                  f"{r['forget_p99_ms']:.1f} | {r['errors']} | - |")
            continue
        print(f"| {r['payload']} | {r['rows']} | {args.clients} | {r['requests']} | {r['requests_per_s']:.1f} | "
              f"{r['rows_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['forgets']} | "
              f"{r['forget_p50_ms']:.1f} | {r['forget_p99_ms']:.1f} | {r['errors']} | "
              f"{r['stale_or_ahead_versions']}/{r['unlogged_versions']} |")
    for name, t in targets.items():
        print(f"target {name}: {t['measured']} ({'met' if t['met'] else 'missed'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1min_at_end": os.getloadavg()[0],
                    "note": "client and server share the machine's cores (and other jobs ran on it)"},
        "model": desc, "server_threads": args.threads, "clients": args.clients, "forgets_per_phase": args.forgets,
        "forget_gap_s": args.forget_gap, "json_decimals": 6, "phases": results, "crashes": crash,
        "targets": targets, "command": " ".join(["python", "benchmarks/bench_serve.py", *(argv or sys.argv[1:])]),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
