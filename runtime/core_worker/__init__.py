"""The core worker: the runtime inside every driver and worker process.

It owns the objects its process creates (reference table + in-process memory
store), submits tasks (leases workers from the raylet, pushes tasks to them on
long-lived streams), executes tasks (worker processes) and serves the
CoreWorker gRPC service that other processes use to reach what it owns.
"""
