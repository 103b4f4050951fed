"""The raylet: one per node. It owns the node's resources and worker pool and
grants worker leases to the core workers that submit tasks."""
