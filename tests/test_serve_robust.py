"""Serving under failure: the dynamic batcher (notebook 24) and the model pool (notebook 27) settle every request,
whatever callers, model functions and worker processes do."""
import asyncio
import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from guide.serve.batcher import DeadlineExceeded, DynamicBatcher
from guide.serve.multimodel import ModelPool, ModelSpec, ModelWorker, PoolFull, _Proc


def lengths(seqs, L): return [len(s) for s in seqs]


def slow_lengths(seqs, L):
    time.sleep(0.1)
    return [len(s) for s in seqs]


# --- DynamicBatcher ---------------------------------------------------------------------------------------------

def test_batcher_survives_a_cancelled_late_request():
    "A request cancelled by its caller after its deadline passed used to kill the batcher thread (InvalidStateError)."
    with DynamicBatcher(slow_lengths, max_batch_size=1, max_queue_delay=0) as b:
        first = b.submit([1, 2]); time.sleep(0.02)
        gone = [b.submit([3], timeout=0.01) for _ in range(3)]
        for f in gone: f.cancel()
        assert first.result(5) == 2
        assert b.submit([4]).result(5) == 1 and b._thread.is_alive()
        late = b.submit([5], timeout=0); time.sleep(0.05)
        with pytest.raises(DeadlineExceeded): late.result(5)


def test_batcher_fails_a_group_with_too_few_results():
    b = DynamicBatcher(lambda seqs, L: [0], max_batch_size=4)
    futs = [b.submit([i + 1]) for i in range(3)]
    with b:
        for f in futs:
            with pytest.raises(RuntimeError, match="1 results for 3 inputs"): f.result(5)
        assert b.stats["errors"] == 1


def test_batcher_survives_a_bug_outside_the_model_call():
    "An exception anywhere in a batch's handling fails that batch; the thread serves the next one."
    class Flaky:
        calls = 0
        @property
        def packed(self):
            Flaky.calls += 1
            if Flaky.calls == 1: raise KeyError("boom")
            return False
        def __call__(self, seqs, L): return lengths(seqs, L)
    with DynamicBatcher(Flaky(), max_batch_size=1, max_queue_delay=0) as b:
        with pytest.raises(KeyError): b.submit([1]).result(5)
        assert b.submit([1, 2]).result(5) == 2


def test_batcher_stop_fails_held_and_queued_requests():
    b = DynamicBatcher(slow_lengths, max_batch_size=2, max_queue_delay=10).start()
    held = b.submit([1]); time.sleep(0.1)                            # taken by the thread, waiting for a fuller batch
    t0 = time.monotonic(); b.stop()
    assert time.monotonic() - t0 < 1                                 # does not sleep out max_queue_delay
    with pytest.raises(RuntimeError, match="batcher stopped"): held.result(1)
    with pytest.raises(RuntimeError, match="batcher stopped"): b.submit([6])
    b.start()                                                        # serves again
    running = [b.submit([1]), b.submit([2])]; time.sleep(0.03)      # a full batch: the model is running it
    queued = [b.submit([3]), b.submit([4])]                          # still in the queue when stop() comes
    b.stop()
    assert [f.result(1) for f in running] == [1, 1]
    for f in queued:
        with pytest.raises(RuntimeError, match="batcher stopped"): f.result(1)
    assert b.queue.qsize() == 0


def test_batcher_stop_fails_asyncio_requests():
    async def main():
        b = DynamicBatcher(lengths, max_batch_size=8, max_queue_delay=10).start()
        futs = [b.asubmit([i + 1]) for i in range(3)]
        await asyncio.sleep(0.1)
        await asyncio.get_running_loop().run_in_executor(None, b.stop)
        return await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 2)
    out = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "stopped" in str(r) for r in out), out


@pytest.mark.parametrize("bad", [dict(buckets=()), dict(buckets=(0, 8)), dict(max_batch_size=0), dict(max_queue_size=0),
                                 dict(max_queue_delay=-0.1), dict(max_queue_delay=float("inf")), dict(max_queue_delay=float("nan"))])
def test_batcher_refuses_bad_settings(bad):
    with pytest.raises(ValueError): DynamicBatcher(lengths, **bad)


# --- ModelWorker / ModelPool ------------------------------------------------------------------------------------

def echo(): return (lambda p: p), 10
def slow_load(): time.sleep(2); return (lambda p: p), 10
def crashy(): return (lambda p: os._exit(1) if p == "crash" else p), 10


@pytest.mark.parametrize("field", ["concurrency", "max_queue", "memory_bytes", "threads"])
def test_model_spec_refuses_bad_limits(field):
    with pytest.raises(ValueError, match=field): ModelSpec("m", echo, **{field: 0})


def test_unloaded_worker_refuses_submit():
    "A worker handed out, then unloaded by another model's load, refuses the request instead of losing it."
    pool = ModelPool(100)
    pool.register(ModelSpec("A", echo, memory_bytes=60)); pool.register(ModelSpec("B", echo, memory_bytes=60))
    try:
        w = pool._ensure("A")
        assert pool.submit("B", "b").result(5) == "b" and pool.events[-2:] == [("unload", "A"), ("load", "B")]
        with pytest.raises(RuntimeError, match="closed"): w.submit("a")
    finally: pool.close()


def test_pinned_worker_is_not_unloaded():
    "Between finding its worker and queueing on it, a request pins the worker: another model's load cannot evict it."
    pool = ModelPool(100)
    pool.register(ModelSpec("A", echo, memory_bytes=60)); pool.register(ModelSpec("B", echo, memory_bytes=60))
    try:
        w = pool._ensure("A", pin=True)
        with pytest.raises(PoolFull): pool.submit("B", "b")
        assert w.submit("a").result(5) == "a"
        pool.pins[w] -= 1
        assert pool.submit("B", "b").result(5) == "b"
    finally: pool.close()


def test_concurrent_submits_to_two_models_all_settle():
    "Two models that do not fit together, hammered from threads: every future settles (answer, PoolFull or QueueFull)."
    pool = ModelPool(100)
    pool.register(ModelSpec("A", echo, memory_bytes=60)); pool.register(ModelSpec("B", echo, memory_bytes=60))
    futs, errors = [], []
    def client(name):
        for i in range(15):
            try: futs.append(pool.submit(name, i))
            except RuntimeError as e: errors.append(e)
    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in "ABAB"]
        for t in threads: t.start()
        for t in threads: t.join(30)
        done, not_done = concurrent.futures.wait(futs, timeout=10)
        assert not not_done and len(futs) + len(errors) == 60
    finally: pool.close()


def test_loading_one_model_does_not_block_another():
    pool = ModelPool(1000)
    pool.register(ModelSpec("A", echo, memory_bytes=10)); pool.register(ModelSpec("S", slow_load, memory_bytes=10))
    try:
        assert pool.submit("A", 0).result(5) == 0
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            loads = [ex.submit(lambda: pool.submit("S", 1).result(10)) for _ in range(2)]   # two requests, one load
            time.sleep(0.3)
            t0 = time.monotonic()
            assert pool.submit("A", 2).result(5) == 2
            assert time.monotonic() - t0 < 1.0
            assert pool.used == 20                   # the model being loaded counts against the budget
            assert [f.result(15) for f in loads] == [1, 1]
        assert pool.events.count(("load", "S")) == 1
    finally: pool.close()


def test_dead_process_fails_its_requests_and_is_replaced():
    "concurrency=1: the crash and the request queued behind it on the same process fail; a new process answers."
    w = ModelWorker(ModelSpec("C", crashy, max_queue=8))
    try:
        assert w.submit("ok").result(5) == "ok"
        futs = [w.submit("crash"), w.submit("later")]
        for f in futs:
            with pytest.raises(RuntimeError, match=r"C: .*died \(exit code 1\)"): f.result(5)
        assert w.alive and w.busy == 0 and w.stats["died"] == w.stats["restarted"] == 1
        assert w.submit("x").result(5) == "x"
    finally: w.close()
    pool = ModelPool(100)
    pool.register(ModelSpec("C", crashy, memory_bytes=60))
    try:
        with pytest.raises(RuntimeError, match="died"): pool.submit("C", "crash").result(5)
        assert pool.submit("C", "again").result(5) == "again"
        assert pool.events == [("load", "C")]
    finally: pool.close()


def sleeper():
    "payload: seconds to sleep, then answer (pid, seconds); 'die': the process kills itself."
    import signal
    def fn(p):
        if p == "die": os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(p); return os.getpid(), p
    return fn, 10


def test_process_death_fails_only_its_own_requests():
    w = ModelWorker(ModelSpec("S", sleeper, concurrency=2, max_queue=16))
    try:
        pids = [s.p.pid for s in w.procs]
        a = w.submit(0.3)                              # process 0 (least busy, first)
        b = w.submit(0.3)                              # process 1
        c = w.submit("die")                            # process 0 again: queued behind a
        d = w.submit(0.2)                              # process 1: queued behind b
        assert w.busy == 4
        assert a.result(5) == (pids[0], 0.3) and b.result(5) == (pids[1], 0.3) and d.result(5) == (pids[1], 0.2)
        with pytest.raises(RuntimeError, match=r"S: .*died \(exit code -9\)"): c.result(5)
        assert w.alive and w.stats["died"] == 1 and w.busy == 0
        new = [s.p.pid for s in w.procs]
        assert new[1] == pids[1] and new[0] not in pids
        futs = [w.submit(0.2) for _ in range(4)]      # spread over both processes, the new one included
        assert sorted(f.result(5) for f in futs) == sorted([(new[0], 0.2)] * 2 + [(new[1], 0.2)] * 2)
    finally: w.close()


def test_too_many_deaths_kill_the_worker():
    w = ModelWorker(ModelSpec("S", sleeper, concurrency=2, max_queue=16), max_restarts=2)
    try:
        for i in range(2):
            with pytest.raises(RuntimeError, match="died"): w.submit("die").result(5)
            assert w.alive and w.stats["died"] == i + 1
        slow = w.submit(2)                             # process 0
        die = w.submit("die")                          # process 1, the least busy
        slow = [slow, w.submit(2)]                     # process 0 again (a tie goes to the first)
        with pytest.raises(RuntimeError, match="died"): die.result(5)   # the third death: more than 2
        assert not w.alive and w.busy == 0
        for f in slow:                                 # fail at once, not after their 2 s
            with pytest.raises(RuntimeError, match="max_restarts"): f.result(1)
        with pytest.raises(RuntimeError, match="dead"): w.submit(0)
    finally: w.close(timeout=0.5)                      # its processes are still sleeping on the failed requests
    assert all(not s.p.is_alive() for s in w.procs)


def test_replacement_that_fails_to_load_kills_the_worker(tmp_path):
    "The first process loads; its replacement's loader raises: the worker is dead, requests waiting for it fail."
    marker = tmp_path / "loaded-once"
    def once():
        if marker.exists(): time.sleep(0.3); raise OSError("weights gone")
        marker.touch(); return crashy()
    w = ModelWorker(ModelSpec("O", once, max_queue=8))
    try:
        assert w.submit("ok").result(5) == "ok"
        crash = w.submit("crash")
        with pytest.raises(RuntimeError, match="died"): crash.result(5)
        late = [w.submit(i) for i in range(3)]         # queued on the new process while it loads, which fails
        for f in late:
            with pytest.raises(RuntimeError, match="weights gone"): f.result(5)
        deadline = time.monotonic() + 5
        while w.alive and time.monotonic() < deadline: time.sleep(0.01)
        assert not w.alive and "weights gone" in w.dead and w.busy == 0
        with pytest.raises(RuntimeError, match="dead"): w.submit(0)
    finally: w.close()


def test_close_fails_requests_on_every_process():
    w = ModelWorker(ModelSpec("S", sleeper, concurrency=2, max_queue=16))
    futs = [w.submit(1) for _ in range(4)]
    t0 = time.monotonic(); w.close(timeout=0.2)
    assert time.monotonic() - t0 < 5
    for f in futs:
        with pytest.raises(RuntimeError, match="closed"): f.result(1)
    with pytest.raises(RuntimeError, match="closed"): w.submit(0)


def test_worker_that_fails_to_load_reports_why():
    def broken(): raise OSError("weights missing")
    with pytest.raises(RuntimeError, match="weights missing"): ModelWorker(ModelSpec("X", broken))
    def vanish(): os._exit(3)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited while loading"): ModelWorker(ModelSpec("Y", vanish))
    assert time.monotonic() - t0 < 5


def test_payload_that_cannot_be_pickled_fails_at_submit():
    "It used to fail in the queue's feeder thread, printing a traceback and leaving its future pending forever."
    w = ModelWorker(ModelSpec("E", echo))
    try:
        with pytest.raises(TypeError, match="E: the payload cannot be sent to a worker process"): w.submit(lambda: 1)
        with pytest.raises(TypeError, match="lock"): w.submit({"lock": threading.Lock()})
        assert w.busy == 0 and w.submit("next").result(5) == "next"
    finally: w.close()


def ends(conn, timeout: float = 2.0) -> bool:
    "Read `conn` to its end: True at EOF; False if it stays open `timeout` s with nothing to read (a read would wait forever)."
    while conn.poll(timeout):
        try: conn.recv()
        except EOFError: return True
    return False


def test_dead_process_pipe_ends_though_another_process_forked_meanwhile(monkeypatch):
    """A process forked from another thread while a new process's pipes were open in the parent inherited the child's end
    of its answer pipe: after that child died, its pipe never reached EOF, and a read (of a half-sent answer) waited forever."""
    from multiprocessing.context import ForkProcess
    start, forking = ForkProcess.start, threading.Event()
    def slow_start(self):                              # the first start waits, its pipes open, while another process starts
        if not forking.is_set(): forking.set(); time.sleep(0.5)
        start(self)
    monkeypatch.setattr(ForkProcess, "start", slow_start)
    spec, other = ModelSpec("E", echo), []
    t = threading.Thread(target=lambda: forking.wait(5) and other.append(_Proc(spec, 10)))
    t.start(); first = _Proc(spec, 10); t.join(10)
    try:
        assert other and other[0].p.is_alive()
        os.kill(first.p.pid, signal.SIGKILL); first.p.join(5)
        assert ends(first.conn)
    finally:
        for s in [first] + other: s.p.kill(); s.p.join(5); s.close()


def nap_or_size():
    "payload: seconds to sleep (a float), or bytes whose length to answer."
    return (lambda p: time.sleep(p) if isinstance(p, float) else len(p)), 10


def test_big_request_to_a_dead_process_leaves_no_blocked_thread():
    """Over 64 KB queued to a process that then died blocked the queue's feeder thread forever: the parent held the pipe's
    read end too, so writing to it never failed. The request fails, close() is prompt and no thread is left behind."""
    before = set(threading.enumerate())
    w = ModelWorker(ModelSpec("N", nap_or_size, max_queue=8))
    try:
        busy, big = w.submit(10.0), w.submit(b"x" * (1 << 20))    # the big one fills the pipe behind the sleeping request
        time.sleep(0.2); os.kill(w.procs[0].p.pid, signal.SIGKILL)
        for f in (busy, big):
            with pytest.raises(RuntimeError, match="died"): f.result(5)
        assert w.submit(b"y" * (1 << 20)).result(5) == 1 << 20  # the new process takes big payloads
    finally:
        t0 = time.monotonic(); w.close(); assert time.monotonic() - t0 < 5
    deadline = time.monotonic() + 2
    while set(threading.enumerate()) - before and time.monotonic() < deadline: time.sleep(0.01)
    assert not set(threading.enumerate()) - before


def test_interpreter_exits_with_a_big_request_still_queued():
    "Without close(): a daemon process still busy, 1 MB queued for it; the interpreter must not wait to hand it over."
    script = """if 1:
        import time
        from guide.serve.multimodel import ModelSpec, ModelWorker
        w = ModelWorker(ModelSpec("N", lambda: ((lambda p: time.sleep(p) if isinstance(p, float) else len(p)), 10)))
        w.submit(30.0); w.submit(b"x" * (1 << 20)); time.sleep(0.2)"""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert time.monotonic() - t0 < 15
