"""The encoder behind `guide serve` end to end over HTTP (loopback): one server process vs several (pre-fork).

Starts `guide serve --no-llm --workers W` on 127.0.0.1, then `--clients` load-generator processes, each running
asyncio clients over raw keep-alive HTTP/1.1 connections (closed loop, bounded in count and time) against /v1/classify.
Reported per W: requests/s, p50/p95/p99 latency, errors. gpu-tier target (issue): >= 10,000 requests/s with
p95 < 50 ms for a MiniLM-L6-sized classifier, which no single Python process can front: hence --workers.

    python benchmarks/serve_http.py --workers 1 2 --requests 2000              # tiny tier, CPU (a smoke of the setup)
    python benchmarks/serve_http.py --tier gpu --device cuda --workers 1 8 --clients 6 --concurrency 384 --requests 200000
"""
from __future__ import annotations

import argparse, json, multiprocessing as mp, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _client(base, texts, n, concurrency, time_limit, q, path="/v1/classify"):
    """Load generator: `concurrency` keep-alive HTTP/1.1 connections on one asyncio loop (uvloop when installed; a
    minimal raw client: httpx's AsyncClient measured ~40 requests/s here, it would be the bottleneck, not the
    server). POSTs the texts to `path`, or GETs `path` when `texts` is None. Reports its own CPU time too, so a
    run can tell a saturated load generator from a saturated server."""
    import asyncio, json, socket
    host, port = base.replace("http://", "").split(":")
    head_of = lambda b: (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % (path.encode(), host.encode(), len(b)) + b)
    reqs = ([head_of(json.dumps({"model": "tiny-encoder", "input": t}).encode()) for t in texts] if texts is not None
            else [b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), host.encode())])
    async def run():
        lat, errors, sent = [], 0, iter(range(n))
        t0, w0, c0 = time.perf_counter(), time.time(), time.process_time()
        async def conn():
            nonlocal errors
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                for i in sent:
                    if time.perf_counter() - t0 > time_limit: return
                    s = time.perf_counter()
                    writer.write(reqs[i % len(reqs)])
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head.split(b" ", 2)[1])
                    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
                    await reader.readexactly(length)
                    if status == 200: lat.append(time.perf_counter() - s)
                    else: errors += 1
            finally: writer.close()
        await asyncio.gather(*[conn() for _ in range(concurrency)])
        return lat, errors, w0, time.time(), time.process_time() - c0
    try: import uvloop; loop_factory = uvloop.new_event_loop
    except ImportError: loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner: q.put(runner.run(run()))


def _server_cpu(proc) -> float:
    "CPU seconds used so far by the server and all its worker processes."
    import psutil
    ps = [psutil.Process(proc.pid)]; ps += ps[0].children(recursive=True)
    total = 0.0
    for p in ps:
        try: t = p.cpu_times(); total += t.user + t.system
        except psutil.NoSuchProcess: pass
    return total


def load(base, texts, a, path="/v1/classify"):
    "Run `a.clients` load-generator processes against `base` until they sent `a.requests` or `a.time_limit` passed."
    q = mp.get_context("spawn").Queue()
    ps = [mp.get_context("spawn").Process(target=_client, args=(base, texts, a.requests // a.clients, max(1, a.concurrency // a.clients),
                                                                  a.time_limit, q, path)) for _ in range(a.clients)]
    for p in ps: p.start()
    results = [q.get(timeout=a.time_limit + 120) for _ in ps]
    for p in ps: p.join(10)
    el = max(r[3] for r in results) - min(r[2] for r in results)     # load time only, not process start-up
    lat = np.array([x for r in results for x in r[0]]) * 1000
    return dict(requests=len(lat), errors=sum(r[1] for r in results), seconds=el, rps=len(lat) / el,
                p50_ms=float(np.percentile(lat, 50)), p95_ms=float(np.percentile(lat, 95)), p99_ms=float(np.percentile(lat, 99)),
                client_cpu_share=sum(r[4] for r in results) / (a.clients * el))   # 1.0: every load generator busy all the time


def start(workers, device, threads, tier, shared_encoder=False, encoder_batch_size=32, encoder_delay=0.005):
    cmd = [sys.executable, "-c", "import sys; from guide.serve.server import main; sys.exit(main(sys.argv[1:]))",   # = `guide serve`
           "--no-llm", "--workers", str(workers), "--port", "0", "--tier", tier, "--threads", str(threads), "--log-level", "error",
           "--encoder-batch-size", str(encoder_batch_size), "--encoder-delay", str(encoder_delay)]
    cmd += (["--device", device] if device else []) + (["--shared-encoder"] if shared_encoder else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    base, said = None, []
    for line in proc.stdout:
        said.append(line)
        if "listening on" in line: base = line.strip().rsplit(" ", 1)[-1]; break
    if base is None: raise RuntimeError("server did not start; it said:\n" + "".join(said[-40:]))
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
    ap.add_argument("--name", default="serve_http", help="results file name: OUT/NAME.json and OUT/NAME.png")
    ap.add_argument("--shared-encoder", action="store_true", help="workers share one encoder process (guide serve --shared-encoder)")
    ap.add_argument("--encoder-batch-size", type=int, default=32, help="most texts the encoder runs together (guide serve --encoder-batch-size)")
    ap.add_argument("--encoder-delay", type=float, default=0.005, help="seconds a batch waits to fill (guide serve --encoder-delay)")
    ap.add_argument("--front-ceiling", action="store_true", help="also load GET /v1/models on the same workers (the HTTP front without the model)")
    ap.add_argument("--tier", default="tiny", help="encoder size: tiny (64 wide, 2 layers) or gpu (MiniLM-L6-sized: 384 wide, 6 layers)")
    a = ap.parse_args(argv)
    from guide.core import atomic_write, environment_info
    from guide.serve.batcher import snippets, tiny_encoder
    encoder = tiny_encoder(a.tier, device=a.device)[0]                 # train and cache it once, before the workers load it
    texts = [t for t, _ in snippets("test", 400, seed=1)]
    runs, ceiling = {}, {}
    for w in a.workers:
        proc, base = start(w, a.device, a.threads, a.tier, a.shared_encoder, a.encoder_batch_size, a.encoder_delay)
        try:
            c0 = _server_cpu(proc)
            runs[w] = load(base, texts, a)
            runs[w]["server_cores_busy"] = (_server_cpu(proc) - c0) / runs[w]["seconds"]
            print(w, "workers:", runs[w], flush=True)
            if a.front_ceiling:          # the same server, a route with no body, no tokenizer, no model: what the HTTP front alone can do
                ceiling[w] = load(base, None, a, "/v1/models")
                print(w, "workers, GET /v1/models:", ceiling[w], flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try: proc.wait(60)
            except subprocess.TimeoutExpired: proc.kill()
    res = dict(benchmark="serve_http", env=environment_info(), device=a.device or "cpu", tier=a.tier, encoder=encoder.config,
               encoder_params=sum(p.numel() for p in encoder.parameters()), shared_encoder=a.shared_encoder,
               encoder_batch_size=a.encoder_batch_size, encoder_delay=a.encoder_delay, clients=a.clients, concurrency=a.concurrency, runs=runs, front_ceiling=ceiling, targets=dict(rps=10_000, p95_ms=50, note="gpu tier, MiniLM-L6-sized classifier"))
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{a.name}.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ws = [str(w) for w in runs]
    ax[0].bar(ws, [r["rps"] for r in runs.values()], label="/v1/classify"); ax[0].set_xlabel("server processes"); ax[0].set_ylabel("requests / s")
    if ceiling: ax[0].plot([str(w) for w in ceiling], [r["rps"] for r in ceiling.values()], "k_", ms=30, mew=2, label="GET /v1/models (front alone)")
    ax[0].axhline(10_000, color="r", ls="--", lw=1, label="target"); ax[0].legend(fontsize=7)
    ax[1].bar(ws, [r["p95_ms"] for r in runs.values()]); ax[1].set_xlabel("server processes"); ax[1].set_ylabel("p95 (ms)")
    ax[1].axhline(50, color="r", ls="--", lw=1)
    fig.suptitle(f"/v1/classify over HTTP ({res['device']}, {a.concurrency} connections)"); fig.tight_layout()
    fig.savefig(out / f"{a.name}.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
