"""The micro-batcher with a real numpy "engine" (a matrix product that records its batch sizes)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from thali.core.inference import BatcherClosed, MicroBatcher


class Engine:
    def __init__(self, delay: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay = delay
        self.weights = np.arange(12, dtype=np.float32).reshape(3, 4)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        time.sleep(self.delay)
        return batch.reshape(len(batch), 3, -1).mean(-1) @ self.weights


def _inputs(n: int, value: float) -> np.ndarray:
    return np.full((n, 3, 2, 2), value, dtype=np.float32)


def test_concurrent_requests_are_gathered_and_answered_with_their_own_rows() -> None:
    engine = Engine(delay=0.02)
    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_ms=50)
    results: dict[int, np.ndarray] = {}

    def request(i: int) -> None:
        batcher.announce()
        time.sleep(0.001 * i)  # "decoding"
        rows, stats = batcher.submit(_inputs(1, i), announced=True).result(timeout=10)
        results[i] = rows
        assert stats.size >= 1 and stats.run_s > 0

    threads = [threading.Thread(target=request, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    for i, rows in results.items():
        np.testing.assert_allclose(rows, _inputs(1, i).reshape(1, 3, -1).mean(-1) @ engine.weights)
    assert sum(engine.sizes) == 16 and max(engine.sizes) > 1 and max(engine.sizes) <= 8


def test_a_lone_request_does_not_wait_for_company() -> None:
    batcher = MicroBatcher(Engine(), max_batch_size=32, max_wait_ms=500)
    started = time.perf_counter()
    batcher.submit(_inputs(2, 1.0)).result(timeout=10)
    assert time.perf_counter() - started < 0.25  # not the 500 ms wait
    batcher.close()


def test_batching_off_runs_each_request_alone_and_a_multi_image_job_in_pieces() -> None:
    engine = Engine()
    batcher = MicroBatcher(engine, max_batch_size=1, max_wait_ms=50)
    futures = [batcher.submit(_inputs(1, i)) for i in range(5)]
    assert [f.result(timeout=10)[0].shape for f in futures] == [(1, 4)] * 5
    big = batcher.submit(_inputs(3, 7.0)).result(timeout=10)[0]  # larger than a batch: pieces, one answer
    assert big.shape == (3, 4)
    batcher.close()
    assert engine.sizes == [1, 1, 1, 1, 1, 1, 1, 1]  # the engine never sees more than max_batch_size


def test_engine_errors_reach_every_waiting_request_and_close_refuses_new_work() -> None:
    def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("engine on fire")

    batcher = MicroBatcher(broken, max_batch_size=4, max_wait_ms=1)
    with pytest.raises(RuntimeError, match="engine on fire"):
        batcher.submit(_inputs(1, 0)).result(timeout=10)
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit(_inputs(1, 0))


def test_close_drains_what_was_accepted() -> None:
    engine = Engine(delay=0.05)
    batcher = MicroBatcher(engine, max_batch_size=2, max_wait_ms=0)
    futures = [batcher.submit(_inputs(1, i)) for i in range(6)]
    batcher.close(drain=True)
    assert all(f.result(timeout=1)[0].shape == (1, 4) for f in futures)


def test_a_request_racing_the_close_is_answered_or_refused_never_left_waiting() -> None:
    """Found under load in CI (a hot swap left one request waiting until its 30 s timeout): a job
    queued after close()'s end-of-queue marker was never run. Every submit now either gets an answer
    or BatcherClosed, however it interleaves with close()."""
    import sys

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to hit the interleavings
    try:
        for _ in range(150):  # bounded
            batcher = MicroBatcher(lambda batch: batch, max_batch_size=4, max_wait_ms=0.5)
            futures, lock = [], threading.Lock()

            def client(batcher: MicroBatcher = batcher, futures: list = futures, lock=lock) -> None:
                for _ in range(50):
                    try:
                        future = batcher.submit(np.zeros((1, 3, 2, 2), np.float32))
                    except BatcherClosed:
                        return
                    with lock:
                        futures.append(future)

            threads = [threading.Thread(target=client) for _ in range(3)]
            for t in threads:
                t.start()
            batcher.close()
            for t in threads:
                t.join(timeout=10)
            for future in futures:
                future.result(timeout=5)  # never a TimeoutError: every queued job ran
    finally:
        sys.setswitchinterval(switch)


def test_two_engine_workers_run_two_batches_at_once_and_drain_on_close() -> None:
    """Each run waits at a two-party barrier: with one worker it would time out (BrokenBarrierError);
    with two, two batches are in the engine together. Every job still gets its own rows, and close()
    runs what was queued before it."""
    barrier = threading.Barrier(2, timeout=10)
    weights = np.arange(12, dtype=np.float32).reshape(3, 4)
    threads: set[str] = set()

    def run(batch: np.ndarray) -> np.ndarray:
        threads.add(threading.current_thread().name)
        if len(threads) <= 2 and batch[0, 0, 0, 0] < 2:  # the first two batches meet in the engine
            barrier.wait()
        return batch.reshape(len(batch), 3, -1).mean(-1) @ weights

    batcher = MicroBatcher(run, max_batch_size=1, max_wait_ms=0, workers=2, name="m")
    futures = [batcher.submit(_inputs(1, i)) for i in range(40)]
    batcher.close(drain=True)
    for i, future in enumerate(futures):
        rows, stats = future.result(timeout=10)
        assert np.allclose(rows, _inputs(1, i).reshape(1, 3, -1).mean(-1) @ weights) and stats.size == 1
    assert threads == {"batcher-m-0", "batcher-m-1"}
    with pytest.raises(BatcherClosed):
        batcher.submit(_inputs(1, 0))
