"""The raylet's lease scheduler, tested without sockets or processes (sans-I/O)."""
import time

from runtime.raylet.scheduler import (AFFINITY_UNKNOWN_NODE_GRACE_S, Grant, KillWorker,
                                      PendingRequest, Reject, RemoteNode, Scheduler, SetupEnv,
                                      Spillback, StartWorkers, Warn, Worker)

NODE = b"n" * 28


def make(cpus=2, gpus=(), workers=2, **extra):
    total = {"CPU": float(cpus), **extra}
    if gpus:
        total["GPU"] = float(len(gpus))
    s = Scheduler(NODE, total, list(gpus))
    for i in range(workers):
        s.worker_registered(Worker(bytes([i]) * 28, 100 + i, 2000 + i, client=50 + i))
    return s


def req(client, rid, **res):
    return PendingRequest(client, rid, {k: float(v) for k, v in res.items()})


def grants(actions):
    return [a for a in actions if isinstance(a, Grant)]


def test_grants_up_to_available_cpus_then_waits():
    s = make(cpus=2, workers=3)
    for i in range(3):
        s.request_lease(req(1, i, CPU=1))
    g = grants(s.schedule())
    assert [a.request_id for a in g] == [0, 1]
    assert s.available["CPU"] == 0
    assert (1, 2) in s.pending
    s.return_lease(g[0].lease_id)
    g2 = grants(s.schedule())
    assert [a.request_id for a in g2] == [2]


def test_infeasible_request_warns_once_and_does_not_block_others():
    s = make(cpus=2)
    s.request_lease(req(1, 1, CPU=8))
    s.request_lease(req(1, 2, CPU=1))
    actions = s.schedule()
    warns = [a for a in actions if isinstance(a, Warn)]
    assert len(warns) == 1 and "CPU" in warns[0].message and "needs 8" in warns[0].message
    assert [a.request_id for a in grants(actions)] == [2]
    assert not [a for a in s.schedule() if isinstance(a, Warn)]  # only once
    assert (1, 1) in s.pending


def test_custom_resource_missing_is_named():
    s = make(cpus=2)
    s.request_lease(req(1, 1, CPU=1, tpu=1))
    (warn,) = [a for a in s.schedule() if isinstance(a, Warn)]
    assert "tpu" in warn.message


def test_starts_only_the_workers_the_free_resources_can_use():
    s = make(cpus=2, workers=0)
    for i in range(10):
        s.request_lease(req(1, i, CPU=1))
    starts = [a for a in s.schedule() if isinstance(a, StartWorkers)]
    assert sum(a.count for a in starts) == 2
    assert not [a for a in s.schedule() if isinstance(a, StartWorkers)]  # already starting


def test_blocked_worker_lends_its_cpu():
    s = make(cpus=1, workers=2)
    s.request_lease(req(1, 1, CPU=1))
    (g,) = grants(s.schedule())
    s.request_lease(req(2, 1, CPU=1))
    assert not grants(s.schedule())
    s.set_blocked(g.worker.worker_id, True)
    (g2,) = grants(s.schedule())
    assert g2.client == 2
    s.set_blocked(g.worker.worker_id, False)
    assert s.available["CPU"] == -1  # oversubscribed until someone returns
    s.return_lease(g2.lease_id)
    s.return_lease(g.lease_id)
    assert s.available["CPU"] == 1


def test_gpu_ids_whole_and_fractional():
    s = make(cpus=4, gpus=[0, 1], workers=4)
    s.request_lease(req(1, 1, CPU=1, GPU=1))
    s.request_lease(req(1, 2, CPU=1, GPU=1))
    s.request_lease(req(1, 3, CPU=1, GPU=1))
    g = grants(s.schedule())
    assert sorted(a.gpu_ids[0] for a in g) == [0, 1]
    assert (1, 3) in s.pending
    s.return_lease(g[0].lease_id)
    s.request_lease(req(2, 1, CPU=1, GPU=0.5))
    s.request_lease(req(2, 2, CPU=1, GPU=0.5))
    got = grants(s.schedule())
    assert got[0].gpu_ids and len(got[0].gpu_ids) == 1


def test_actor_lease_holds_less_than_it_needs_to_place():
    s = make(cpus=1, workers=2)
    s.request_lease(PendingRequest(1, 1, {"CPU": 1.0}, hold={}))
    (g,) = grants(s.schedule())
    assert s.available["CPU"] == 1.0
    s.request_lease(req(2, 1, CPU=1))
    assert grants(s.schedule())


def test_disconnected_client_loses_requests_and_its_workers_are_killed():
    s = make(cpus=2)
    s.request_lease(req(7, 1, CPU=1))
    (g,) = grants(s.schedule())
    s.request_lease(req(7, 2, CPU=8))
    kills = s.client_disconnected(7)
    assert kills == [KillWorker(g.worker.worker_id, "its lease holder disconnected")]
    assert not s.pending


def test_worker_death_releases_its_lease():
    s = make(cpus=1)
    s.request_lease(req(1, 1, CPU=1))
    (g,) = grants(s.schedule())
    lease = s.worker_died(g.worker.worker_id)
    assert lease is not None and s.available["CPU"] == 1.0


def test_node_affinity_to_unknown_node_rejects_unless_soft():
    s = make()
    # Older than the grace: this raylet's view had time to learn of the node.
    hard = PendingRequest(1, 1, {"CPU": 1.0}, strategy="NODE_AFFINITY", affinity_node=b"x" * 28,
                          since=time.monotonic() - AFFINITY_UNKNOWN_NODE_GRACE_S - 1)
    soft = PendingRequest(1, 2, {"CPU": 1.0}, strategy="NODE_AFFINITY", affinity_node=b"x" * 28,
                          soft=True)
    s.request_lease(hard)
    s.request_lease(soft)
    actions = s.schedule()
    assert [type(a) for a in actions if not isinstance(a, StartWorkers)] == [Reject, Grant]


def test_hard_affinity_to_a_node_not_in_the_view_yet_waits_for_it():
    """The GCS knows a node this raylet's view has not caught up with (it just joined, or
    came back after its agent restarted): the request waits for the view, then goes there."""
    s = make()
    new = b"j" * 28
    s.request_lease(PendingRequest(1, 1, {"CPU": 1.0}, strategy="NODE_AFFINITY",
                                   affinity_node=new))
    assert [a for a in s.schedule() if not isinstance(a, StartWorkers)] == []
    assert s.waits_for_view()
    s.set_remote_nodes({new: RemoteNode(new, "127.0.0.2:7000", {"CPU": 2.0}, {"CPU": 2.0})})
    (a,) = [a for a in s.schedule() if not isinstance(a, StartWorkers)]
    assert isinstance(a, Spillback) and a.raylet_address == "127.0.0.2:7000"
    assert not s.waits_for_view()


def test_hard_affinity_to_a_node_seen_leaving_is_rejected_at_once():
    s = make()
    gone = b"g" * 28
    s.set_remote_nodes({gone: RemoteNode(gone, "127.0.0.2:7000", {"CPU": 2.0}, {"CPU": 2.0})})
    s.set_remote_nodes({})
    s.request_lease(PendingRequest(1, 1, {"CPU": 1.0}, strategy="NODE_AFFINITY",
                                   affinity_node=gone))
    (a,) = [a for a in s.schedule() if not isinstance(a, StartWorkers)]
    assert isinstance(a, Reject) and "not alive" in a.message


def test_spillback_to_a_node_that_has_the_resource():
    s = make()
    other = b"o" * 28
    s.remote_nodes[other] = RemoteNode(other, "127.0.0.2:7000", {"CPU": 2.0, "tpu": 4.0},
                                       {"CPU": 2.0, "tpu": 4.0})
    s.request_lease(req(1, 1, tpu=1))
    (a,) = s.schedule()
    assert isinstance(a, Spillback) and a.raylet_address == "127.0.0.2:7000"


def test_idle_workers_above_the_cpu_count_are_stopped():
    s = make(cpus=1, workers=3)
    import time

    assert len(s.idle_workers_to_stop(time.monotonic() + 100, 1.0)) == 2


def test_draining_node_sends_new_work_elsewhere_or_rejects_it():
    s = make()
    s.request_lease(req(1, 1, CPU=1))
    (running,) = grants(s.schedule())
    s.draining = True
    s.request_lease(req(1, 2, CPU=1))
    (reject,) = [a for a in s.schedule() if not isinstance(a, StartWorkers)]
    assert isinstance(reject, Reject) and "draining" in reject.message
    other = b"o" * 28
    s.remote_nodes[other] = RemoteNode(other, "127.0.0.3:7000", {"CPU": 4.0}, {"CPU": 4.0})
    s.request_lease(req(1, 3, CPU=1))
    (spill,) = [a for a in s.schedule() if not isinstance(a, StartWorkers)]
    assert isinstance(spill, Spillback) and spill.raylet_address == "127.0.0.3:7000"
    assert running.lease_id in s.leases  # work already running is left alone


# -- SPREAD ---------------------------------------------------------------------------------------
def spread(client, rid, grant_or_reject=False, **res):
    return PendingRequest(client, rid, {k: float(v) for k, v in res.items()}, strategy="SPREAD",
                          grant_or_reject=grant_or_reject)


def with_other_node(s, cpus=2.0, node_id=b"o" * 28, address="127.0.0.2:7000", **extra):
    total = {"CPU": cpus, **extra}
    s.remote_nodes[node_id] = RemoteNode(node_id, address, dict(total), dict(total))
    return s.remote_nodes[node_id]


def placed(actions):
    """Where each request went: 'here' (granted) or the raylet address it was spilled to."""
    out = {}
    for a in actions:
        if isinstance(a, Grant):
            out[a.request_id] = "here"
        elif isinstance(a, Spillback):
            out[a.request_id] = a.raylet_address
    return out


def test_spread_alternates_between_the_nodes_that_have_room():
    s = make(cpus=4, workers=4)
    with_other_node(s, cpus=4)
    for i in range(4):
        s.request_lease(spread(1, i, CPU=1))
    where = placed(s.schedule())
    assert sorted(where.values()) == ["127.0.0.2:7000"] * 2 + ["here"] * 2
    assert where[0] != where[1] and where[1] != where[2] and where[2] != where[3]
    # DEFAULT keeps the same work on this node, which can run it.
    d = make(cpus=4, workers=4)
    with_other_node(d, cpus=4)
    for i in range(4):
        d.request_lease(req(1, i, CPU=1))
    assert set(placed(d.schedule()).values()) == {"here"}


def test_spread_charges_what_it_spilled_to_its_view_of_the_other_node():
    s = make(cpus=4, workers=4)
    other = with_other_node(s, cpus=1)
    for i in range(4):
        s.request_lease(spread(1, i, CPU=1))
    where = placed(s.schedule())
    # The other node has one free CPU: once it took one request, the rest stay here.
    assert list(where.values()).count("127.0.0.2:7000") == 1
    assert list(where.values()).count("here") == 3
    assert other.available["CPU"] == 0.0


def test_spread_falls_back_to_busy_nodes_when_none_has_room():
    s = make(cpus=1, workers=1)
    with_other_node(s, cpus=1)
    s.request_lease(req(9, 0, CPU=1))
    grants(s.schedule())  # this node is now full
    s.remote_nodes[b"o" * 28].available["CPU"] = 0.0  # and so is the other one
    for i in range(1, 5):
        s.request_lease(spread(1, i, CPU=1))
    where = placed(s.schedule())
    assert list(where.values()) == ["127.0.0.2:7000"] * 2  # half spilled, half wait here
    assert [k for k in s.pending] in ([(1, 1), (1, 3)], [(1, 2), (1, 4)])


def test_spread_request_is_placed_once_and_then_waits_where_it_was_placed():
    s = make(cpus=1, workers=1)
    with_other_node(s, cpus=1)
    s.request_lease(req(9, 0, CPU=1))
    (busy,) = grants(s.schedule())
    s.request_lease(spread(1, 1, CPU=1))
    s.request_lease(spread(1, 2, CPU=1))
    first = placed(s.schedule())
    assert list(first.values()) == ["127.0.0.2:7000"]
    (waiting,) = [k for k in s.pending if k[0] == 1]
    for _ in range(3):  # later passes neither spill it nor spin the round-robin
        assert placed(s.schedule()) == {}
    s.return_lease(busy.lease_id)
    assert placed(s.schedule()) == {waiting[1]: "here"}


def test_spread_only_over_nodes_with_the_resource_and_never_twice():
    s = make(cpus=2, workers=2)
    with_other_node(s, cpus=2, tpu=1)
    with_other_node(s, cpus=2, tpu=1, node_id=b"p" * 28, address="127.0.0.3:7000")
    for i in range(4):
        s.request_lease(spread(1, i, CPU=1, tpu=1))
    where = list(placed(s.schedule()).values())
    assert sorted(where) == ["127.0.0.2:7000"] * 2 + ["127.0.0.3:7000"] * 2
    assert where[0] != where[1]
    # On the chosen node a spilled request (grant_or_reject) is decided there, never re-spread;
    # with no other node SPREAD runs here.
    t = make(cpus=2, workers=2)
    with_other_node(t, cpus=2)
    for i in range(4):
        t.request_lease(spread(1, i, grant_or_reject=True, CPU=1))
    assert list(placed(t.schedule()).values()) == ["here", "here"]
    u = make(cpus=2, workers=2)
    for i in range(2):
        u.request_lease(spread(1, i, CPU=1))
    assert list(placed(u.schedule()).values()) == ["here", "here"]


# -- placement-group bundles: Prepare / Commit / Cancel in every arrival order ----------------------
PG = "ab" * 18


def no_group_names(s):
    return not [k for k in list(s.total) + list(s.available) if "_group_" in k]


def test_removal_in_any_arrival_order_leaves_nothing_reserved():
    """The GCS sends Commit only after Prepare answered, but a removal's Cancel may reach the
    raylet before, between or after them (a Prepare still in flight when the group is
    removed). Whatever the order, nothing stays reserved and no group resource remains."""
    prepare = ("prepare", lambda s: s.prepare_bundles(PG, [(0, {"CPU": 0.5}), (1, {"CPU": 0.25})]))
    commit = ("commit", lambda s: s.commit_bundles(PG, [0, 1]))
    remove = ("remove", lambda s: s.cancel_bundles(PG, [0, 1], remove=True))
    for order in ([prepare, commit, remove], [prepare, remove, commit], [remove, prepare, commit]):
        s = make(cpus=2)
        for _name, step in order:
            step(s)
        names = [name for name, _ in order]
        assert s.available["CPU"] == 2.0, (names, s.available)
        assert no_group_names(s), (names, s.total)
        assert not s.prepared and not s.committed, names


def test_prepare_of_a_removed_group_is_refused_with_the_reason():
    s = make(cpus=2)
    s.cancel_bundles(PG, [0], remove=True)
    problem = s.prepare_bundles(PG, [(0, {"CPU": 1.0})])
    assert problem is not None and PG in problem and "removed" in problem
    assert s.available["CPU"] == 2.0


def test_a_repeated_prepare_reserves_once():
    """A Prepare whose answer was lost may reach the raylet again (the GCS retries the
    group): the bundle is reserved once, so one Cancel gives all of it back."""
    s = make(cpus=2)
    assert s.prepare_bundles(PG, [(0, {"CPU": 1.0})]) is None
    assert s.prepare_bundles(PG, [(0, {"CPU": 1.0})]) is None
    assert s.available["CPU"] == 1.0
    s.commit_bundles(PG, [0])
    assert s.prepare_bundles(PG, [(0, {"CPU": 1.0})]) is None  # committed already: nothing more
    assert s.available["CPU"] == 1.0
    s.cancel_bundles(PG, [0])
    s.cancel_bundles(PG, [0])  # a Cancel is idempotent too
    assert s.available["CPU"] == 2.0 and no_group_names(s)



def test_removed_groups_are_remembered_within_a_bound():
    from runtime.raylet import scheduler as sched_mod

    s = make(cpus=1)
    for i in range(sched_mod.REMOVED_GROUPS_KEPT + 50):
        s.cancel_bundles(f"{i:032x}", [0], remove=True)
    assert len(s.removed_groups) == sched_mod.REMOVED_GROUPS_KEPT
    assert f"{0:032x}" not in s.removed_groups  # the oldest were forgotten
    newest = f"{sched_mod.REMOVED_GROUPS_KEPT + 49:032x}"
    assert s.prepare_bundles(newest, [(0, {"CPU": 0.5})]) is not None  # still refused


def test_a_prepare_that_arrives_after_its_cancel_reserves_nothing():
    # The GCS gave up on attempt 1's Prepare (no answer) and cancelled it; the Prepare then
    # arrives. It must not reserve, or the bundle would stay reserved with nobody owning it.
    s = make(cpus=2)
    pg = "ab" * 16
    s.cancel_bundles(pg, [0], attempt=1)
    assert "already cancelled" in s.prepare_bundles(pg, [(0, {"CPU": 1.0})], attempt=1)
    assert s.available["CPU"] == 2.0
    assert s.prepare_bundles(pg, [(0, {"CPU": 1.0})], attempt=2) is None  # the next attempt
    assert s.available["CPU"] == 1.0


# -- workers pooled by runtime_env ---------------------------------------------------------------
def env_req(client, rid, env, **res):
    r = req(client, rid, **(res or {"CPU": 1}))
    r.env = env
    return r


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def test_a_runtime_env_is_set_up_once_then_gets_workers_of_its_own():
    s = make(cpus=4, workers=1)  # one idle worker of no runtime_env
    s.request_lease(env_req(1, 1, "envX"))
    first = s.schedule()
    assert [a.env for a in of(first, SetupEnv)] == ["envX"]
    assert not grants(first) and not of(first, StartWorkers)  # never the plain worker
    assert not of(s.schedule(), SetupEnv)  # set up once, however often it is scheduled
    s.env_ready("envX")
    (start,) = of(s.schedule(), StartWorkers)
    assert (start.count, start.env) == (1, "envX")
    s.worker_registered(Worker(b"x" * 28, 300, 3000, client=60, env="envX"))
    (g,) = grants(s.schedule())
    assert g.worker.env == "envX" and g.request_id == 1
    s.request_lease(req(2, 1, CPU=1))  # no runtime_env: the plain worker
    (g2,) = grants(s.schedule())
    assert g2.worker.env == "" and g2.worker.worker_id == bytes([0]) * 28


def test_an_idle_worker_of_another_runtime_env_is_never_granted():
    s = make(cpus=4, workers=0)
    s.worker_registered(Worker(b"y" * 28, 301, 3001, client=61, env="envY"))
    s.env_ready("envX")
    s.request_lease(env_req(1, 1, "envX"))
    actions = s.schedule()
    assert not grants(actions)
    assert [(a.count, a.env) for a in of(actions, StartWorkers)] == [(1, "envX")]
    assert s.reason_text(s.pending[(1, 1)]).startswith("waiting for a worker to start")


def test_workers_starting_are_counted_per_runtime_env():
    s = make(cpus=4, workers=0)
    s.env_ready("envX")
    for i in range(2):
        s.request_lease(env_req(1, i, "envX"))
    s.request_lease(req(2, 1, CPU=1))
    starts = of(s.schedule(), StartWorkers)
    assert [(a.env, a.count) for a in starts] == [("envX", 2)]  # FIFO, max_starting 2
    assert not of(s.schedule(), StartWorkers)  # no slot left, none started twice
    s.worker_registered(Worker(b"x" * 28, 302, 3002, client=62, env="envX"))
    actions = s.schedule()
    assert [g.request_id for g in grants(actions)] == [0]
    assert [(a.env, a.count) for a in of(actions, StartWorkers)] == [("", 1)]
    assert s.starting_env == {"envX": 1, "": 1}


def test_a_setup_in_progress_holds_no_starting_slot():
    s = Scheduler(NODE, {"CPU": 4.0}, [], max_starting=1)
    s.request_lease(env_req(1, 1, "envSlow"))
    assert of(s.schedule(), SetupEnv)
    s.request_lease(req(2, 1, CPU=1))
    starts = of(s.schedule(), StartWorkers)
    assert [(a.env, a.count) for a in starts] == [("", 1)]
    assert "runtime_env to be set up" in s.reason_text(s.pending[(1, 1)])


def test_a_failed_setup_rejects_the_requests_of_that_env_only_and_is_tried_again():
    s = make(cpus=4, workers=1)
    s.request_lease(env_req(1, 1, "envX"))
    s.request_lease(env_req(1, 2, "envX"))
    s.request_lease(env_req(3, 1, "envZ"))
    s.schedule()
    s.env_failed("envX", "pip install failed: no such package")
    actions = s.schedule()
    rejects = of(actions, Reject)
    assert sorted(r.request_id for r in rejects) == [1, 2]
    assert all(r.runtime_env and "no such package" in r.message for r in rejects)
    assert (3, 1) in s.pending  # another env still waits for its own setup
    s.request_lease(env_req(1, 3, "envX"))
    assert [a.env for a in of(s.schedule(), SetupEnv)] == ["envX"]  # a new attempt
    s.env_failed("", "ignored")  # no environment to blame: nothing is rejected
    assert not of(s.schedule(), Reject)


# -- label selectors (runtime/labels.py) -------------------------------------------------------
def labelled(client, rid, selector, strategy="DEFAULT", grant_or_reject=False, **res):
    from runtime.labels import check_selector, compile_selector

    return PendingRequest(client, rid, {k: float(v) for k, v in res.items()}, strategy=strategy,
                          grant_or_reject=grant_or_reject,
                          selector=compile_selector(check_selector(selector)))


def labelled_node(s, labels, node_id=b"o" * 28, address="127.0.0.2:7000", cpus=2.0):
    s.remote_nodes[node_id] = RemoteNode(node_id, address, {"CPU": cpus}, {"CPU": cpus},
                                         labels=dict(labels, **{"ray.io/node-id": node_id.hex()}))


def test_every_node_is_labelled_with_its_node_id():
    s = Scheduler(NODE, {"CPU": 1.0}, [], labels={"zone": "a"})
    assert s.labels == {"zone": "a", "ray.io/node-id": NODE.hex()}
    s.request_lease(labelled(1, 1, {"ray.io/node-id": NODE.hex()}, CPU=1))
    s.request_lease(labelled(1, 2, {"ray.io/node-id": "!" + NODE.hex()}, CPU=1))
    s.worker_registered(Worker(b"w" * 28, 1, 1, client=9))
    actions = s.schedule()
    assert [a.request_id for a in grants(actions)] == [1]
    assert (1, 2) in s.pending


def test_a_node_with_an_accelerator_type_is_labelled_with_it():
    s = Scheduler(NODE, {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H200": 1.0}, [0])
    assert s.labels == {"ray.io/node-id": NODE.hex(), "ray.io/accelerator-type": "H200"}


def test_a_selector_that_this_node_matches_runs_here():
    s = Scheduler(NODE, {"CPU": 2.0}, [], labels={"zone": "a", "disk": "ssd"})
    s.worker_registered(Worker(b"w" * 28, 1, 1, client=9))
    labelled_node(s, {"zone": "b"})
    s.request_lease(labelled(1, 1, {"zone": "in(a, c)", "disk": "ssd"}, CPU=1))
    assert [a.request_id for a in grants(s.schedule())] == [1]


def test_a_selector_only_another_node_matches_is_spilled_there():
    s = make()
    labelled_node(s, {"zone": "b"}, node_id=b"x" * 28, address="127.0.0.3:7000")
    labelled_node(s, {"zone": "a"}, node_id=b"y" * 28, address="127.0.0.2:7000")
    s.request_lease(labelled(1, 1, {"zone": "a"}, CPU=1))
    s.request_lease(labelled(1, 2, {"zone": "!in(a, c)"}, CPU=1))  # no label here: matches
    s.request_lease(labelled(1, 3, {"zone": "!b", "gpu": "!in(t4)"}, CPU=1))
    where = placed(s.schedule())
    assert where == {1: "127.0.0.2:7000", 2: "here", 3: "here"}


def test_a_selector_no_node_matches_waits_warns_once_and_blocks_nothing():
    s = make()
    labelled_node(s, {"zone": "b"})
    s.request_lease(labelled(1, 1, {"zone": "a"}, CPU=1))
    s.request_lease(req(1, 2, CPU=1))
    actions = s.schedule()
    (warn,) = [a for a in actions if isinstance(a, Warn)]
    assert "zone: a" in warn.message and "label" in warn.message
    assert [a.request_id for a in grants(actions)] == [2]
    assert (1, 1) in s.pending
    (pending,) = [r for r in s.pending.values()]
    assert "labels matching" in s.reason_text(pending) and "zone: a" in s.reason_text(pending)
    assert s.pending_demand() == [({"CPU": 1.0}, True)]
    assert not [a for a in s.schedule() if isinstance(a, Warn)]
    # a matching node joins: the request goes there
    labelled_node(s, {"zone": "a"}, node_id=b"z" * 28, address="127.0.0.9:7000")
    (spill,) = [a for a in s.schedule() if isinstance(a, Spillback)]
    assert spill.request_id == 1 and spill.raylet_address == "127.0.0.9:7000"


def test_a_spilled_request_is_not_spilled_again_when_labels_do_not_match():
    s = make()
    labelled_node(s, {"zone": "a"})
    s.request_lease(labelled(1, 1, {"zone": "a"}, grant_or_reject=True, CPU=1))
    actions = s.schedule()
    assert not [a for a in actions if isinstance(a, (Spillback, Grant))]
    assert (1, 1) in s.pending


def test_spread_only_takes_nodes_whose_labels_match():
    s = make(cpus=4, workers=4)
    labelled_node(s, {"zone": "a"}, node_id=b"x" * 28, address="127.0.0.2:7000", cpus=4)
    labelled_node(s, {"zone": "b"}, node_id=b"y" * 28, address="127.0.0.3:7000", cpus=4)
    for i in range(4):
        s.request_lease(labelled(1, i, {"zone": "a"}, strategy="SPREAD", CPU=1))
    assert set(placed(s.schedule()).values()) == {"127.0.0.2:7000"}


def test_a_draining_node_spills_only_to_a_matching_node():
    s = make()
    s.draining = True
    labelled_node(s, {"zone": "b"}, node_id=b"x" * 28, address="127.0.0.3:7000")
    labelled_node(s, {"zone": "a"}, node_id=b"y" * 28, address="127.0.0.2:7000")
    s.request_lease(labelled(1, 1, {"zone": "a"}, CPU=1))
    (spill,) = [a for a in s.schedule() if isinstance(a, Spillback)]
    assert spill.raylet_address == "127.0.0.2:7000"


# -- max_calls: a worker that exits on purpose ----------------------------------------------------
def test_a_worker_whose_lease_returns_exiting_is_never_granted_again():
    s = make(cpus=2, workers=1)
    s.request_lease(req(1, 1, CPU=1))
    (g,) = grants(s.schedule())
    gone = s.return_lease(g.lease_id, worker_exiting=True)
    assert gone is not None and gone.worker_id == g.worker.worker_id
    assert g.worker.worker_id not in s.workers and g.worker.worker_id not in s.idle
    assert s.available["CPU"] == 2.0
    s.request_lease(req(1, 2, CPU=1))
    actions = s.schedule()
    assert not grants(actions)
    assert [a.count for a in actions if isinstance(a, StartWorkers)] == [1]
    # the process then exits: not a leased worker dying, nothing to release twice
    assert s.worker_died(g.worker.worker_id) is None
    assert s.available["CPU"] == 2.0


def test_a_lease_keeps_what_the_memory_monitor_weighs():
    s = make(cpus=2, workers=2)
    s.request_lease(PendingRequest(1, 1, {"CPU": 1.0}, name="f", retriable=True))
    s.request_lease(PendingRequest(2, 2, {"CPU": 1.0}, name="actor A", is_actor=True))
    first, second = grants(s.schedule())
    a, b = s.leases[first.lease_id], s.leases[second.lease_id]
    assert (a.retriable, a.name, a.is_actor) == (True, "f", False)
    assert (b.retriable, b.name, b.is_actor) == (False, "actor A", True)
    assert b.lease_id > a.lease_id  # the newest grant has the highest id
