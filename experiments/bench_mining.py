"""Triplet mining speed and memory: facenet_jax.losses next to pytorch-metric-learning.

For each batch size B (PK batches, K images per identity, d-dimensional L2-normalised
embeddings) and each strategy, one forward+backward pass (loss and gradient w.r.t. the
embeddings) is timed after warm-up; the median over repeats is reported. Each implementation is
measured in fresh subprocesses, so it pays for its own buffers and allocator, not for the other's:

* time: default environment, ``--warmup`` untimed calls, then up to ``--repeats`` timed calls.
* memory: a second subprocess with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc then maps every large
  buffer and unmaps it when freed, so resident memory tracks live buffers instead of the heap's
  high-water mark); "peak MB" is the peak resident memory (VmHWM) over 3 calls (1 if a call
  takes more than 5 s) minus the resident memory just before them (after imports, inputs and XLA
  compilation, heap trimmed).

The peer is pytorch-metric-learning (a benchmark-only extra: ``pip install -e .[bench]``) with
its own distance (LpDistance: Euclidean on normalised embeddings), so ours runs with
``squared=False`` unless ``--squared``. Its closest equivalents:

  semi_hard  -> TripletMarginMiner(type_of_triplets="semihard") + TripletMarginLoss
  batch_all  -> TripletMarginMiner(type_of_triplets="all") + TripletMarginLoss
  batch_hard -> BatchHardMiner + TripletMarginLoss
  hardest    -> TripletMarginMiner(type_of_triplets="hard") + TripletMarginLoss
  random     -> TripletMarginLoss without a miner (all triplets, its unmined baseline)

The miners build every (a, p, n) triplet, so the peer is run under an address-space cap
(``--peer-mem-gb``) and a time limit; a run that exceeds either is reported as n/a with the reason.

  python experiments/bench_mining.py                       # the table in docs/bench_mining.md
  python experiments/bench_mining.py --batch-sizes 256 --strategies semi_hard --repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

_SLOW_S = 5.0  # a call slower than this is not repeated more than needed
STRATEGIES = ["semi_hard", "batch_all", "batch_hard", "hardest", "random"]
PEER = {
    "semi_hard": "TripletMarginMiner(semihard)",
    "batch_all": "TripletMarginMiner(all)",
    "batch_hard": "BatchHardMiner",
    "hardest": "TripletMarginMiner(hard)",
    "random": "no miner (all triplets)",
}


# ----------------------------------------------------------------------------- worker side


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _inputs(batch: int, dim: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(batch, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.repeat(np.arange(batch // k), k).astype(np.int32)
    return emb, labels


def _ours(emb, labels, strategy, margin, squared):
    import jax
    import jax.numpy as jnp

    from facenet_jax.losses import triplet_loss

    key = jax.random.key(0)

    def loss(e, lab):
        return triplet_loss(e, lab, strategy=strategy, margin=margin, squared=squared, key=key)[0]

    step = jax.jit(jax.value_and_grad(loss))
    e, lab = jnp.asarray(emb), jnp.asarray(labels)
    temp_mb = step.lower(e, lab).compile().memory_analysis().temp_size_in_bytes / 2**20
    return (lambda: jax.block_until_ready(step(e, lab))), {"xla_temp_mb": round(temp_mb, 1)}


def _peer(emb, labels, strategy, margin, squared):
    import torch
    from pytorch_metric_learning import losses, miners

    torch.set_num_threads(os.cpu_count() or 1)
    loss_fn = losses.TripletMarginLoss(margin=margin)
    miner = {
        "semi_hard": lambda: miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard"),
        "batch_all": lambda: miners.TripletMarginMiner(margin=margin, type_of_triplets="all"),
        "batch_hard": miners.BatchHardMiner,
        "hardest": lambda: miners.TripletMarginMiner(margin=margin, type_of_triplets="hard"),
        "random": lambda: None,
    }[strategy]()
    e0, lab = torch.from_numpy(emb), torch.from_numpy(labels.astype(np.int64))

    def step():
        e = e0.clone().requires_grad_(True)
        loss = loss_fn(e, lab, miner(e, lab)) if miner is not None else loss_fn(e, lab)
        loss.backward()
        return e.grad

    return step, {}


def worker(args) -> None:
    if args.impl == "peer" and args.peer_mem_gb > 0:
        cap = int(args.peer_mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    emb, labels = _inputs(args.batch, args.dim, args.k)
    result = {"impl": args.impl, "strategy": args.strategy, "batch": args.batch}
    try:
        step, extra = (_ours if args.impl == "ours" else _peer)(
            emb, labels, args.strategy, args.margin, args.squared
        )
        result.update(extra)
        if args.measure == "time":
            for _ in range(args.warmup):
                t = time.perf_counter()
                step()
                slow = time.perf_counter() - t > _SLOW_S
                if slow:  # minutes-long calls: one warm-up and as few timed calls as allowed
                    break
            times, start = [], time.perf_counter()
            while len(times) < args.repeats and (
                len(times) < (1 if slow else 3) or time.perf_counter() - start < args.time_budget
            ):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            result.update(ms=round(1000 * float(np.median(times)), 2), calls=len(times))
        else:
            # Baseline after imports, inputs and compilation, with freed heap returned to the OS.
            _malloc_trim()
            result["peak_reset"] = _reset_peak()
            base = _status_mb("VmRSS")
            for _ in range(3):
                t = time.perf_counter()
                step()
                if time.perf_counter() - t > _SLOW_S:
                    break
            result["peak_mb"] = round(_status_mb("VmHWM") - base, 1)
    except (MemoryError, RuntimeError) as err:  # torch reports a failed allocation as RuntimeError
        msg = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        oom = isinstance(err, MemoryError) or "alloc" in msg.lower() or "memory" in msg.lower()
        result["error"] = f"out of memory (> {args.peer_mem_gb:g} GB cap)" if oom else msg
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver side


def _run(impl: str, strategy: str, batch: int, args) -> dict:
    """Time in one fresh subprocess, memory in another; merged, or {"error": reason}."""
    merged = {}
    for measure in ("time", "memory"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl]
        cmd += ["--measure", measure, "--strategy", strategy, "--batch", str(batch)]
        cmd += ["--dim", str(args.dim), "--k", str(args.k), "--margin", str(args.margin)]
        cmd += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
        cmd += ["--time-budget", str(args.time_budget), "--peer-mem-gb", str(args.peer_mem_gb)]
        cmd += ["--squared"] if args.squared else []
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_repo_root())
        if measure == "memory":
            env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # RSS tracks live buffers
        try:
            out = subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.timeout, env=env, check=False
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out (> {args.timeout} s)"}
        result = next(
            (json.loads(x[7:]) for x in out.stdout.splitlines() if x.startswith("RESULT ")), None
        )
        if result is None:
            tail = (out.stderr.strip().splitlines() or ["no output"])[-1][:120]
            how = f"killed by signal {-out.returncode}" if out.returncode < 0 else "failed"
            return {"error": f"{how}: {tail}"}
        if "error" in result:
            return result
        merged.update(result)
    return merged


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peer_available() -> str | None:
    code = "import torch, pytorch_metric_learning"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if probe.returncode:
        return "torch / pytorch-metric-learning not installed (pip install -e .[bench])"
    return None


def _fmt(x, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:,.1f}{unit}" if x < 100 else f"{x:,.0f}{unit}"


def main(args) -> None:
    peer_missing = None if args.no_peer else _peer_available()
    if args.no_peer:
        peer_missing = "skipped (--no-peer)"
    header = (
        "| B | strategy | ours ms | ours peak MB | XLA temp MB | peer (pytorch-metric-learning) "
        "| peer ms | peer peak MB | speed-up | memory ratio |"
    )
    lines = [header, "|" + "---|" * 10]
    print(header, flush=True)
    notes = []
    for batch in args.batch_sizes:
        for strategy in args.strategies:
            ours = _run("ours", strategy, batch, args)
            peer = {"error": peer_missing} if peer_missing else _run("peer", strategy, batch, args)
            speed = mem = None
            if "error" not in ours and "error" not in peer:
                speed = peer["ms"] / ours["ms"]
                mem = peer["peak_mb"] / max(ours["peak_mb"], 1.0)
            row = [
                str(batch),
                strategy,
                _fmt(ours.get("ms")) if "error" not in ours else f"n/a ({ours['error']})",
                _fmt(ours.get("peak_mb")),
                _fmt(ours.get("xla_temp_mb")),
                PEER[strategy],
                _fmt(peer.get("ms")) if "error" not in peer else f"n/a ({peer['error']})",
                _fmt(peer.get("peak_mb")),
                "n/a" if speed is None else f"{speed:,.0f}x",
                "n/a" if mem is None else f"{mem:,.1f}x",
            ]
            for r in (ours, peer):
                if r.get("peak_reset") is False:
                    notes.append(f"{r['impl']} B={batch} {strategy}: VmHWM not resettable")
            line = "| " + " | ".join(row) + " |"
            lines.append(line)
            print(line, flush=True)
    if notes:
        print("\n".join(notes))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    p.add_argument("--dim", type=int, default=128, help="embedding size d")
    p.add_argument("--k", type=int, default=8, help="images per identity (K of the PK batch)")
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--squared", action="store_true", help="ours on squared distances")
    p.add_argument("--repeats", type=int, default=7, help="timed calls (at least 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compile etc.)")
    p.add_argument("--time-budget", type=float, default=60.0, help="s of timed calls, >= 3 calls")
    p.add_argument("--timeout", type=int, default=900, help="s per measurement subprocess")
    p.add_argument("--peer-mem-gb", type=float, default=6.0, help="address-space cap of the peer")
    p.add_argument("--no-peer", action="store_true", help="measure only facenet_jax")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--measure", choices=["time", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    parsed = parse()
    worker(parsed) if parsed.worker else main(parsed)
