"""The encoder behind `guide serve` end to end over HTTP (loopback): one server process vs several (pre-fork).

Starts `guide serve --no-llm --workers W` on 127.0.0.1, then `--clients` load-generator processes, each running
asyncio clients over keep-alive connections (closed loop, bounded in count and time) against /v1/classify.
Reported per W: requests/s, p50/p95/p99 latency, errors. gpu-tier target (issue): >= 10,000 requests/s with
p95 < 50 ms for a MiniLM-L6-sized classifier, which no single Python process can front: hence --workers.

    python benchmarks/serve_http.py --workers 1 2 --requests 2000              # tiny tier, CPU (a smoke of the setup)
    python benchmarks/serve_http.py --device cuda --workers 1 8 --clients 6 --concurrency 384 --requests 200000
"""
from __future__ import annotations

import argparse, json, multiprocessing as mp, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _client(base, texts, n, concurrency, time_limit, q):
    import asyncio, httpx
    async def run():
        lat, errors = [], 0
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as c:
            t0, sent = time.perf_counter(), iter(range(n))
            async def one():
                nonlocal errors
                for i in sent:
                    if time.perf_counter() - t0 > time_limit: return
                    s = time.perf_counter()
                    r = await c.post("/v1/classify", json={"model": "tiny-encoder", "input": texts[i % len(texts)]})
                    if r.status_code == 200: lat.append(time.perf_counter() - s)
                    else: errors += 1
            await asyncio.gather(*[one() for _ in range(concurrency)])
        return lat, errors
    q.put(asyncio.run(run()))


def start(workers, device, threads):
    cmd = [str(Path(sys.executable).parent / "guide"), "serve", "--no-llm", "--workers", str(workers), "--port", "0",
           "--threads", str(threads), "--log-level", "error"] + (["--device", device] if device else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    base = None
    for line in proc.stdout:
        if "listening on" in line: base = line.strip().rsplit(" ", 1)[-1]; break
    if base is None: raise RuntimeError("server did not start")
    import httpx
    pids, t0 = set(), time.monotonic()
    while len(pids) < workers and time.monotonic() - t0 < 300:      # every worker loaded and answering
        try:
            with httpx.Client(base_url=base, timeout=5) as c:
                r = c.get("/ready")
                if r.status_code == 200: pids.add(c.get("/health").json()["pid"])
        except httpx.TransportError: pass
        time.sleep(0.05)
    return proc, base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2]); ap.add_argument("--device", default=None)
    ap.add_argument("--clients", type=int, default=1, help="load-generator processes")
    ap.add_argument("--concurrency", type=int, default=64, help="connections in flight, all clients together")
    ap.add_argument("--requests", type=int, default=2000); ap.add_argument("--time-limit", type=float, default=120)
    ap.add_argument("--threads", type=int, default=1); ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    from guide.core import environment_info
    from guide.serve.batcher import snippets
    texts = [t for t, _ in snippets("test", 400, seed=1)]
    runs = {}
    for w in a.workers:
        proc, base = start(w, a.device, a.threads)
        try:
            q = mp.get_context("spawn").Queue()
            per = a.requests // a.clients
            ps = [mp.get_context("spawn").Process(target=_client, args=(base, texts, per, max(1, a.concurrency // a.clients), a.time_limit, q))
                  for _ in range(a.clients)]
            t0 = time.perf_counter()
            for p in ps: p.start()
            results = [q.get(timeout=a.time_limit + 120) for _ in ps]
            el = time.perf_counter() - t0
            for p in ps: p.join(10)
            lat = np.array([x for r, _ in results for x in r]) * 1000
            runs[w] = dict(requests=len(lat), errors=sum(e for _, e in results), seconds=el, rps=len(lat) / el,
                           p50_ms=float(np.percentile(lat, 50)), p95_ms=float(np.percentile(lat, 95)), p99_ms=float(np.percentile(lat, 99)))
            print(w, "workers:", runs[w], flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try: proc.wait(60)
            except subprocess.TimeoutExpired: proc.kill()
    res = dict(benchmark="serve_http", env=environment_info(), device=a.device or "cpu", clients=a.clients, concurrency=a.concurrency,
               runs=runs, targets=dict(rps=10_000, p95_ms=50, note="gpu tier, MiniLM-L6-sized classifier"))
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".serve_http.json.tmp"; tmp.write_text(json.dumps(res, indent=1)); os.replace(tmp, out / "serve_http.json")
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ws = [str(w) for w in runs]
    ax[0].bar(ws, [r["rps"] for r in runs.values()]); ax[0].set_xlabel("server processes"); ax[0].set_ylabel("requests / s")
    ax[1].bar(ws, [r["p95_ms"] for r in runs.values()]); ax[1].set_xlabel("server processes"); ax[1].set_ylabel("p95 (ms)")
    fig.suptitle(f"/v1/classify over HTTP ({res['device']}, {a.concurrency} connections)"); fig.tight_layout()
    fig.savefig(out / "serve_http.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
