"""The one exception type the agent's operations raise towards its API."""
from __future__ import annotations

import grpc


class AgentError(Exception):
    """A request the agent refuses or cannot carry out: a gRPC status and one line
    that says what failed and what to do."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
