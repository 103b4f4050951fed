"""raytop's filter grammar where it runs (no processes): the GCS's task store and actor
query, the agent's tables (agent/views.py make_table) and the grammar itself
(runtime/util/query.py). Keys are case-insensitive, a free-text term matches within one
field (so regex anchors mean the start and end of a field), `node=` is a node's id or
its IP in every view, and resources in reasons read `{GPU: 1}`."""
import pytest

from agent.cluster import node_record
from agent.views import make_table
from runtime.gcs.actor_manager import ACTOR_ALIASES, ACTOR_FIELDS
from runtime.gcs.placement_groups import plan
from runtime.gcs.task_events import TaskEventStore
from runtime.protocol import agent_pb2, common_pb2, gcs_pb2
from runtime.util import query
from runtime.util.state.records import actor_record, task_dict

NODE_A, NODE_B = bytes.fromhex("aa" * 28), bytes.fromhex("bb" * 28)
IPS = {NODE_A: "127.0.0.1", NODE_B: "127.0.0.2"}
#: Task state indexes (runtime/core_worker/task_events.py TASK_STATES).
PENDING_ARGS, PENDING_NODE, SUBMITTED, RUNNING, FINISHED = range(5)


def _store() -> TaskEventStore:
    """Three tasks: waits_arg pending on its argument, train_step running on 127.0.0.2,
    evaluate finished on 127.0.0.1."""
    store = TaskEventStore(100)
    batch = gcs_pb2.TaskEventBatch(job_id=b"\x01\x00\x00\x00")
    for i, (func, states, node) in enumerate((
            ("waits_arg", (PENDING_ARGS, PENDING_NODE), b""),
            ("train_step", (PENDING_ARGS, PENDING_NODE, SUBMITTED, RUNNING), NODE_B),
            ("evaluate", (PENDING_ARGS, PENDING_NODE, SUBMITTED, RUNNING, FINISHED), NODE_A))):
        tid = bytes([i + 1]) * 24
        batch.statics.add(task_id=tid, name=func, type="NORMAL_TASK", func_or_class_name=func)
        for k, s in enumerate(states):
            batch.task_ids.append(tid)
            batch.states.append(s)
            batch.times.append(100.0 + i + k * 0.1)
        if node:
            batch.outcomes.add(task_id=tid, node_id=node, worker_pid=4000 + i)
    store.add(batch)
    return store


def gcs_tasks(text: str) -> list:
    """The functions of the tasks the GCS's ListTasks returns for a filter."""
    reply = _store().query(gcs_pb2.ListTasksRequest(filter=text, sort="func_or_class_name"),
                           IPS, lambda rec: "waiting for argument object 00ff")
    assert not reply.error, reply.error
    return [t.static.func_or_class_name for t in reply.tasks]


def _actors() -> list:
    out = []
    for i, (cls, state, node) in enumerate((("Counter", "ALIVE", NODE_A),
                                            ("Trainer", "PENDING_CREATION", b""),
                                            ("Server", "ALIVE", NODE_B))):
        info = gcs_pb2.ActorInfo(actor_id=bytes([i + 1]) * 16, class_name=cls, state=state,
                                 job_id=b"\x01\x00\x00\x00", node_id=node,
                                 pid=5000 + i if node else 0, namespace="default")
        if node:
            info.address.CopyFrom(common_pb2.Address(ip=IPS[node], port=30000 + i))
        out.append(actor_record(info))
    return out


def gcs_actors(text: str) -> list:
    """The classes of the actors the GCS's QueryActors keeps for a filter (its own
    parse and match, on its own records)."""
    flt = query.parse(text, ACTOR_FIELDS, ACTOR_ALIASES, "actors")
    return [r["class_name"] for r in _actors() if not flt or flt.matches(r)]


def _nodes() -> list:
    return [node_record(gcs_pb2.NodeInfo(
        node_id=nid, node_ip=ip, alive=True, is_head=ip.endswith(".1"), start_time=1.0,
        resources_total={"CPU": 4.0}, resources_available={"CPU": 4.0},
        object_store_memory=1 << 30), 100.0) for nid, ip in IPS.items()]


def table(view: str, records: list, text: str) -> list:
    """The row keys of the agent's table for a view and a filter."""
    out = agent_pb2.Table()
    make_table(view, records, text, "", False, 0, out)
    return [r.key for r in out.rows]


# -- 1. keys are case-insensitive everywhere ------------------------------------------------------
@pytest.mark.parametrize("text", ["STATE=PENDING", "State=pending", "FUNC_OR_CLASS_NAME=waits",
                                  "Func_Or_Class_Name==WAITS_ARG", "STATE!=running state!=FINISHED"])
def test_task_keys_are_case_insensitive_in_the_gcs(text):
    assert gcs_tasks(text) == ["waits_arg"]


@pytest.mark.parametrize("text", ["STATE=PENDING", "CLASS_NAME=trainer", "State==PENDING_CREATION"])
def test_actor_keys_are_case_insensitive_in_the_gcs(text):
    assert gcs_actors(text) == ["Trainer"]


def test_field_names_are_case_insensitive_in_the_agents_tables():
    assert table("nodes", _nodes(), "NODE_IP=127.0.0.2") == [NODE_B.hex()]
    assert table("nodes", _nodes(), "Role=head") == [NODE_A.hex()]


# -- 2. a free-text term matches within one field ---------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("^wait", ["waits_arg"]),                 # the start of a field, not only of the task id
    ("arg$", ["waits_arg"]),                  # the end of a field
    ("^waits_arg$", ["waits_arg"]),
    ("^train", ["train_step"]),
    ("!^wait", ["evaluate", "train_step"]),
    ("^127\\.0\\.0\\.2$", ["train_step"]),    # the node's IP is a field too
    ("^(evaluate|train_step)$", ["evaluate", "train_step"]),
    ("^ait|^eval", ["evaluate"]),             # anchored: "ait" is inside a field, not at its start
])
def test_regex_anchors_mean_a_field_in_the_gcs(text, expected):
    assert gcs_tasks(text) == expected


def test_a_term_never_spans_two_fields():
    # state and node ip are neighbouring fields of a record: a regex that would need
    # the end of one and the start of the next matches nothing
    assert gcs_tasks(r"RUNNING\s*127") == []
    assert gcs_actors(r"ALIVE\s127") == []
    assert gcs_actors("Counter.*ALIVE") == []
    assert gcs_actors("ALIVE") == ["Counter", "Server"]


def test_regex_anchors_mean_a_field_in_the_agents_tables():
    assert table("nodes", _nodes(), "^127.0.0.2$") == [NODE_B.hex()]
    assert table("nodes", _nodes(), "^head$") == [NODE_A.hex()]


# -- 3. node= is a node's id or its IP, in every view ----------------------------------------------
def test_node_key_is_the_id_or_the_ip_in_the_nodes_view():
    nodes = _nodes()
    assert table("nodes", nodes, "node=127.0.0.2") == [NODE_B.hex()]   # the example
    assert table("nodes", nodes, "node=bbbb") == [NODE_B.hex()]        # an id prefix, as shown
    assert table("nodes", nodes, "NODE=127.0.0.1") == [NODE_A.hex()]
    assert table("nodes", nodes, "!node=127.0.0.2") == [NODE_A.hex()]  # neither id nor IP
    assert table("nodes", nodes, "ip=127.0.0.2") == [NODE_B.hex()]


def test_node_key_is_the_id_or_the_ip_for_tasks_and_actors():
    assert gcs_tasks("state=PENDING node=127.0.0.2") == []               # the example
    assert gcs_tasks("state=RUNNING node=127.0.0.2") == ["train_step"]
    assert gcs_tasks("node=bbbbbbbb") == ["train_step"]
    assert gcs_tasks("!node=bbbbbbbb") == ["evaluate", "waits_arg"]
    assert gcs_actors("node=127.0.0.2") == ["Server"]
    assert gcs_actors("node=aaaaaaaa") == ["Counter"]
    assert gcs_actors("!node=aaaaaaaa") == ["Trainer", "Server"]


def test_node_key_in_the_agents_task_table():
    tasks = [task_dict(bytes([i + 1]) * 24, b"\x01\x00\x00\x00",
                       (f, "NORMAL_TASK", b"", b"", {}, b"", f), (node, b"w" * 28, 7, "", "", 0),
                       [PENDING_ARGS, PENDING_NODE, SUBMITTED, RUNNING], [1.0, 1.1, 1.2, 1.3],
                       node_ips=IPS, events=False, now=2.0)
             for i, (f, node) in enumerate((("a", NODE_A), ("b", NODE_B)))]
    assert table("tasks", tasks, "node=127.0.0.2") == [(bytes([2]) * 24).hex()]
    assert table("tasks", tasks, "node=aaaa") == [(bytes([1]) * 24).hex()]


# -- 4. the rest of the grammar, as the GCS runs it ------------------------------------------------
def test_unknown_key_names_the_keys_there_are_and_the_closest():
    reply = _store().query(gcs_pb2.ListTasksRequest(filter="Colour=red"), IPS)
    assert "no field 'Colour' in tasks" in reply.error
    for key in ("node", "state", "function", "func_or_class_name"):
        assert f" {key}," in reply.error or reply.error.endswith(f" {key}")
    reply = _store().query(gcs_pb2.ListTasksRequest(filter="STAT=PENDING"), IPS)
    assert "no field 'STAT' in tasks (did you mean 'state'?)" in reply.error
    with pytest.raises(query.FilterError, match="did you mean 'restarts'"):
        query.parse("restart>0", ACTOR_FIELDS, ACTOR_ALIASES, "actors")


def test_invert_and_substring_in_the_gcs():
    assert gcs_tasks("state=pending") == ["waits_arg"]             # PENDING_NODE_ASSIGNMENT
    assert gcs_tasks("!STATE=pending") == ["evaluate", "train_step"]
    assert gcs_tasks("!train") == ["evaluate", "waits_arg"]
    assert gcs_tasks("!!train") == ["train_step"]
    assert gcs_tasks("Function=STEP") == ["train_step"]


# -- 5. resources in pending reasons read as everywhere else ----------------------------------------
def test_placement_group_reasons_write_resources_without_quotes():
    nodes = [(NODE_A, {"CPU": 4.0}, {"CPU": 1.0})]
    _, why = plan("PACK", [{"GPU": 1.0}], nodes)
    assert "{GPU: 1}" in why and "'" not in why
    _, why = plan("STRICT_PACK", [{"CPU": 1.0}, {"CPU": 1.0}], nodes)
    assert "{CPU: 2}" in why and "'" not in why
    _, why = plan("SPREAD", [{"CPU": 2.0}], nodes)
    assert "{CPU: 2}" in why and "'" not in why
