"""The micro-batcher (mmapp.batching) with a plain function: each caller gets its own result, batches
form under concurrency, a failing item fails only its own caller, and max_size is respected."""
from __future__ import annotations

import threading

import pytest

from mmapp.batching import MicroBatcher


def run_concurrently(batcher: MicroBatcher, items: list) -> dict:
    results, barrier = {}, threading.Barrier(len(items))

    def call(item):
        barrier.wait()
        try:
            results[item] = batcher.submit(item, timeout_s=30)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertions
            results[item] = exc

    threads = [threading.Thread(target=call, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_each_caller_gets_its_own_result_from_shared_batches():
    calls = []

    def square(batch: list[int]) -> list[int]:
        calls.append(list(batch))
        return [x * x for x in batch]

    batcher = MicroBatcher(square, max_size=4, max_wait_ms=100)
    results = run_concurrently(batcher, list(range(12)))
    batcher.close()
    assert results == {x: x * x for x in range(12)}
    assert max(len(c) for c in calls) > 1 and all(len(c) <= 4 for c in calls)
    assert sorted(x for c in calls for x in c) == list(range(12))
    assert batcher.stats.items == 12 and batcher.stats.batches == len(calls)


def test_a_failing_item_fails_only_its_own_caller():
    def fragile(batch: list[int]) -> list[int]:
        if 3 in batch:
            raise ValueError("three is bad")
        return [x + 1 for x in batch]

    batcher = MicroBatcher(fragile, max_size=8, max_wait_ms=100)
    results = run_concurrently(batcher, list(range(6)))
    batcher.close()
    assert isinstance(results[3], ValueError)
    assert {k: v for k, v in results.items() if k != 3} == {x: x + 1 for x in range(6) if x != 3}


def test_a_lone_caller_waits_at_most_max_wait_and_bad_settings_are_refused():
    batcher = MicroBatcher(lambda b: [x * 2 for x in b], max_size=8, max_wait_ms=1)
    assert batcher.submit(21, timeout_s=5) == 42
    batcher.close()
    with pytest.raises(ValueError):
        MicroBatcher(lambda b: b, max_size=0, max_wait_ms=1)
    wrong = MicroBatcher(lambda b: [], max_size=1, max_wait_ms=0)
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        wrong.submit(1, timeout_s=5)
    wrong.close()


def test_batch_images_setting():
    import torch

    from mmapp.device import Placement
    from mmapp.predictor import batching_wanted

    class Tower:
        def __init__(self, device: str):
            self.placement = Placement(torch.device(device), torch.float32)

    assert batching_wanted("auto", Tower("cuda")) and not batching_wanted("auto", Tower("cpu"))
    assert batching_wanted("on", Tower("cpu")) and batching_wanted("True", Tower("cpu"))
    assert not batching_wanted("off", Tower("cuda")) and not batching_wanted("false", Tower("cuda"))
    with pytest.raises(ValueError, match="auto, on or off"):
        batching_wanted("sometimes", Tower("cpu"))
