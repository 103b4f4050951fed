"""The owner's state machine for generator tasks' stream items
(runtime/core_worker/owner_state.py), and the GeneratorStream that keeps them
(runtime/core_worker/generators.py). Without sockets or processes, as
tests/test_scheduler.py tests the raylet's."""
from __future__ import annotations

import pytest

from runtime.core_worker.memory_store import Value
from runtime.core_worker.owner_actions import Finish, RequestLease, StreamItem
from runtime.core_worker.owner_records import FINISHED, SUBMITTED_TO_WORKER, PendingTask
from runtime.protocol import common_pb2

from helpers.owner_machine import machine, of, result, running, task


# -- generator tasks (stream items) -------------------------------------------------------------
def _item(t: PendingTask, index: int) -> common_pb2.TaskResult:
    r = common_pb2.TaskResult(task_id=t.task_id, stream_item=True, item_index=index)
    r.returns.add(object_id=t.task_id + bytes([index + 2]), inline_data=b"v")
    return r


def test_stream_items_go_to_the_stream_and_keep_the_task_in_flight():
    m = machine()
    t = task()
    t.generator = 1
    link, _ = running(m, t)
    out = m.task_result(link, _item(t, 0))
    (item,) = of(out, StreamItem)
    assert item.task is t and item.result.item_index == 0
    assert link.inflight == {t.task_id: t} and t.state == SUBMITTED_TO_WORKER
    out = m.task_result(link, result(t))
    assert of(out, Finish)[0].task is t and t.state == FINISHED
    # An item that comes after the final result still reaches the stream ...
    assert of(m.task_result(link, _item(t, 1)), StreamItem)[0].task is t
    # ... until the shell says every item is in.
    m.stream_closed(t.task_id)
    assert m.task_result(link, _item(t, 2)) == []


def test_stream_items_of_a_retried_generator_task_are_still_accepted():
    m = machine()
    t = task(retries=1)
    t.generator = 1
    link, _ = running(m, t)
    m.task_result(link, _item(t, 0))
    out = m.worker_lost(link, "killed")
    assert t.attempt == 1 and of(out, RequestLease)
    # The new attempt's items come on another link; the task is found by id.
    assert of(m.task_result(link, _item(t, 1)), StreamItem)[0].task is t


def test_plain_task_ignores_stray_stream_items():
    m = machine()
    t = task()
    link, _ = running(m, t)
    assert m.task_result(link, _item(t, 0)) == []
    assert link.inflight == {t.task_id: t}


class _Owner:
    """What GeneratorStream needs of its core worker, without a cluster."""

    def __init__(self) -> None:
        from runtime.core_worker.memory_store import MemoryStore
        from runtime.core_worker.reference_table import ReferenceTable

        self.address = ("127.0.0.1", 1, b"w" * 28)
        self.memory = MemoryStore()
        self.refs = ReferenceTable(self.address, lambda *a: None, lambda *a: None,
                                   lambda *a: None)


def test_generator_stream_dedups_retried_items_and_acks_consumption():
    from runtime.core_worker.generators import GeneratorStream

    owner = _Owner()
    s = GeneratorStream(b"t" * 24, backpressure=2)
    acks = []
    s.ack = acks.append
    assert s.add_item(0, Value(b"a"), owner)
    assert not s.add_item(0, Value(b"again"), owner)  # a retry re-sends item 0
    assert s.add_item(1, Value(b"b"), owner)
    assert s.next_ready()
    r0 = s.take(timeout=1)
    assert owner.memory.get(r0.binary()).data == b"a" and acks == [1]
    s.take(timeout=1)
    assert acks == [1, 2]
    with pytest.raises(TimeoutError):
        s.take(timeout=0.05)
    s.finish(2)
    assert s.complete() and s.take(timeout=1) is None and s.is_finished()


def test_generator_stream_failure_becomes_the_next_item():
    from runtime.core_worker.generators import GeneratorStream

    owner = _Owner()
    s = GeneratorStream(b"u" * 24)
    s.add_item(0, Value(b"a"), owner)
    s.fail(Value(b"err", is_error=True), owner)
    assert s.end == 2 and s.complete()
    s.take(timeout=1)
    err = s.take(timeout=1)
    assert owner.memory.get(err.binary()).is_error
    assert s.take(timeout=1) is None
