"""The names every component uses for task states, actor states and scheduling
strategy kinds: the protobuf enums of protos common.proto, in one place.

Task states travel as TaskState numbers (TaskEventBatch.states); actor states and
strategy kinds still travel as the enum's names in string fields (ActorInfo.state,
SchedulingStrategy.kind), so their constants here are those names.
"""
from __future__ import annotations

from runtime.protocol import common_pb2

#: Task state names by number (the state API and raytop show these; Ray's names).
TASK_STATES = tuple(common_pb2.TaskState.Name(v) for v in sorted(common_pb2.TaskState.values()))
# The task states the owner moves a task through (common.proto's TaskState numbers).
PENDING_ARGS_AVAIL = common_pb2.PENDING_ARGS_AVAIL
PENDING_NODE_ASSIGNMENT = common_pb2.PENDING_NODE_ASSIGNMENT
SUBMITTED_TO_WORKER = common_pb2.SUBMITTED_TO_WORKER
RUNNING = common_pb2.RUNNING
FINISHED = common_pb2.FINISHED
FAILED = common_pb2.FAILED

_actor = common_pb2.ActorState.Name
ACTOR_PENDING_CREATION = _actor(common_pb2.PENDING_CREATION)
ACTOR_ALIVE = _actor(common_pb2.ALIVE)
ACTOR_RESTARTING = _actor(common_pb2.RESTARTING)
ACTOR_DEAD = _actor(common_pb2.DEAD)

_kind = common_pb2.SchedulingStrategy.Kind.Name
STRATEGY_DEFAULT = _kind(common_pb2.SchedulingStrategy.DEFAULT)
STRATEGY_SPREAD = _kind(common_pb2.SchedulingStrategy.SPREAD)
STRATEGY_NODE_AFFINITY = _kind(common_pb2.SchedulingStrategy.NODE_AFFINITY)
STRATEGY_PLACEMENT_GROUP = _kind(common_pb2.SchedulingStrategy.PLACEMENT_GROUP)
