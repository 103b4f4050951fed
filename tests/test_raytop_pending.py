"""Why is it pending? The raylet's scheduler records a reason for every request it
cannot grant yet (sans-I/O, no sockets), and the filter grammar raytop, the agent
and the GCS share."""
import pytest

from runtime.raylet.scheduler import PendingRequest, RemoteNode
from runtime.util import query

from test_scheduler import make


def req(client, rid, name="f", **res):
    return PendingRequest(client, rid, {k: float(v) for k, v in res.items()}, name=name)


def reasons(s):
    return {r.request_id: text for r, text in s.pending_reasons()}


def test_infeasible_request_says_what_no_node_has():
    s = make(cpus=2)
    s.remote_nodes[b"r" * 28] = RemoteNode(b"r" * 28, "127.0.0.2:1", {"CPU": 4.0}, {"CPU": 4.0})
    s.request_lease(req(1, 1, GPU=1))
    s.request_lease(req(1, 2, CPU=8))
    s.schedule()
    why = reasons(s)
    assert why[1] == "needs {GPU: 1}; no alive node has GPU"
    assert why[2] == "needs {CPU: 8}; the largest node has CPU: 4"


def test_busy_node_says_it_waits_for_free_resources():
    s = make(cpus=1, workers=2)
    s.request_lease(req(1, 1, CPU=1))
    s.request_lease(req(1, 2, CPU=1))
    s.schedule()
    why = reasons(s)
    assert 1 not in why  # granted
    assert why[2] == "waiting for free resources: needs {CPU: 1}; {CPU: 0} of {CPU: 1} free"


def test_no_idle_worker_says_it_waits_for_a_worker_to_start():
    s = make(cpus=2, workers=0)
    s.request_lease(req(1, 1, CPU=1))
    s.schedule()
    assert reasons(s)[1].startswith("waiting for a worker to start")


def test_placement_group_request_waits_for_its_group():
    s = make(cpus=2)
    pg = "ab" * 9
    s.request_lease(PendingRequest(1, 1, {f"CPU_group_{pg}": 1.0}, strategy="PLACEMENT_GROUP"))
    s.schedule()
    assert reasons(s)[1] == f"waiting for placement group {pg} to be created on this node"


def test_reason_changes_when_the_cause_does():
    s = make(cpus=1, workers=1)
    s.request_lease(req(1, 1, CPU=1))
    (g,) = [a for a in s.schedule() if hasattr(a, "lease_id")]
    s.request_lease(req(1, 2, CPU=1))
    s.schedule()
    assert reasons(s)[2].startswith("waiting for free resources")
    s.worker_died(g.worker.worker_id)  # its CPU comes back, but no idle worker is left
    s.schedule()
    assert reasons(s)[2].startswith("waiting for a worker to start")


def test_pending_demand_carries_function_job_and_reason():
    s = make(cpus=1, workers=0)
    r = req(1, 1, name="train", GPU=1)
    r.job_id = b"\x01\x00\x00\x00"
    s.request_lease(r)
    s.schedule()
    (d,) = s.pending_demand_detail()
    assert d.name == "train" and d.job_id == b"\x01\x00\x00\x00" and d.infeasible
    assert d.reason == "needs {GPU: 1}; no alive node has GPU"


# -- the filter grammar -------------------------------------------------------------------------
ROWS = [
    {"actor_id": "aa01", "class_name": "Counter", "state": "ALIVE", "node_ip": "127.0.0.1",
     "num_restarts": 0, "pid": 101},
    {"actor_id": "bb02", "class_name": "Trainer", "state": "PENDING_CREATION",
     "node_ip": "127.0.0.2", "num_restarts": 2, "pid": None},
    {"actor_id": "cc03", "class_name": "Counter", "state": "DEAD", "node_ip": "127.0.0.2",
     "num_restarts": 10, "pid": 77},
]
ALIASES = {"class": "class_name", "node": "node_ip", "restarts": "num_restarts"}


def ids(text, **kw):
    flt = query.parse(text, ROWS[0].keys(), ALIASES)
    rows, n = query.apply(ROWS, flt, **kw)
    assert n == len(rows) or kw.get("limit")
    return [r["actor_id"] for r in rows]


@pytest.mark.parametrize("text,expected", [
    ("counter", ["aa01", "cc03"]),                  # substring anywhere, any case
    ("!counter", ["bb02"]),                         # inverted
    ("state=PENDING", ["bb02"]),                    # substring on a column
    ("node=127.0.0.2 class=counter", ["cc03"]),     # terms are ANDed; aliases
    ("state!=dead", ["aa01", "bb02"]),
    ("^(aa|cc)0", ["aa01", "cc03"]),                # a regex
    ("restarts>1", ["bb02", "cc03"]),               # numeric
    ("restarts>=10", ["cc03"]),
    ("state==alive", ["aa01"]),                     # exact
    ("'127.0.0.1'", ["aa01"]),
    ("[unclosed", []),                              # not a regex: a plain substring
    ("STATE=pending CLASS=Trainer", ["bb02"]),      # keys in any case: aliases...
    ("Class_Name==COUNTER Node_IP=.2", ["cc03"]),   # ...and field names
    ("^counter$", ["aa01", "cc03"]),                # anchors: a field's start and end
    ("^127.0.0.1$", ["aa01"]),
    ("ALIVE.*127", []),                             # no match spans two fields
    ("!^trainer$", ["aa01", "cc03"]),
])
def test_filter_grammar(text, expected):
    assert ids(text) == expected


def test_sort_numbers_numerically_and_missing_values_last():
    assert ids("", sort="num_restarts", descending=True) == ["cc03", "bb02", "aa01"]
    assert ids("", sort="pid") == ["cc03", "aa01", "bb02"]
    assert ids("", sort="pid", descending=True) == ["aa01", "cc03", "bb02"]
    assert ids("", sort="class_name", limit=1) == ["aa01"]


def test_unknown_key_names_the_fields_there_are():
    with pytest.raises(query.FilterError, match="no field 'colour'.*class_name"):
        query.parse("colour=red", ROWS[0].keys(), ALIASES, what="actors")
    with pytest.raises(query.FilterError, match="not a number"):
        query.parse("pid>abc", ROWS[0].keys())


# -- the GCS's side: its event log and its task query (no sockets) -------------------------------
def test_event_log_is_bounded_folds_repeats_and_reads_from_a_sequence_number():
    from runtime.gcs.events import EventLog

    log = EventLog(size=3)
    log.record("node", "n1", "joined", "10.0.0.1", when=100.0)
    for k in range(50):  # a burst of identical failures: one entry with a count
        log.record("task", f"f{k % 2}", "failed", "ValueError: x", when=101.0 + k * 0.01)
    (node, task) = log.list().events
    assert node.subject == "n1" and task.count == 50 and task.state == "failed"
    seen = log.list().last_seq
    log.record("actor", "a1", "restarting", "Counter: died", when=102.0)
    log.record("node", "n2", "died", "no report", when=103.0)
    newer = log.list(after_seq=seen).events
    assert [e.subject for e in newer] == ["a1", "n2"]
    assert [e.kind for e in log.list().events] == ["task", "actor", "node"]  # 3 kept
    assert log.dropped == 1
    log.record("task", "f0", "failed", "ValueError: x", when=200.0)  # later than FOLD_S
    assert log.list().events[-1].count == 1


def test_task_query_filters_sorts_summarises_and_says_why_where_the_tasks_are():
    from runtime.gcs.task_events import TaskEventStore
    from runtime.protocol import gcs_pb2

    store = TaskEventStore(100)
    node = b"n" * 28
    batch = gcs_pb2.TaskEventBatch(job_id=b"\x01\x00\x00\x00")
    for i in range(10):
        tid = bytes([i]) * 24
        name = "train" if i % 2 else "load"
        batch.statics.add(task_id=tid, name=name, type="NORMAL_TASK", func_or_class_name=name)
        states = [0, 1] if i < 3 else [0, 1, 2, 3, 4]
        for state in states:
            batch.task_ids.append(tid)
            batch.states.append(state)
            batch.times.append(float(i * 10 + state))
        if i >= 3:
            batch.outcomes.add(task_id=tid, node_id=node, worker_pid=100 + i)
    store.add(batch)

    def query(**kw):
        return store.query(gcs_pb2.ListTasksRequest(**kw), {node: "10.0.0.9"},
                           lambda rec: f"because {rec.static[0]}")

    r = query(filter="state=PENDING", summary=True, limit=2)
    assert r.matched == 3 and len(r.tasks) == 2 and r.total == 10
    assert {t.pending_reason for t in r.tasks} <= {"because train", "because load"}
    assert {(s.func_or_class_name, dict(s.state_counts)["PENDING_NODE_ASSIGNMENT"])
            for s in r.summary} == {("load", 2), ("train", 1)}
    r = query(filter="node=10.0.0.9 function=train", sort="pid", descending=True)
    assert [t.outcome.worker_pid for t in r.tasks] == [109, 107, 105, 103]
    r = query(filter="reason=because")  # the raylets' reasons filter like any field
    assert r.matched == 3
    assert "no field 'colour'" in query(filter="colour=red").error


def test_an_owners_reason_for_a_task_waiting_on_its_arguments_is_kept():
    from runtime.gcs.task_events import TaskEventStore
    from runtime.protocol import gcs_pb2

    store = TaskEventStore(10)
    tid = b"t" * 24
    batch = gcs_pb2.TaskEventBatch(job_id=b"\x01\x00\x00\x00", task_ids=[tid], states=[0],
                                   times=[1.0])
    batch.statics.add(task_id=tid, name="g", func_or_class_name="g")
    batch.reasons.add(task_id=tid, reason="waiting for argument object ab12")
    store.add(batch)
    (rec,) = store.tasks.values()
    assert rec.reason == "waiting for argument object ab12"
