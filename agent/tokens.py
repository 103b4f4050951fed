"""What the agent accepts as a cluster token, and where agentctl takes one from.

The token is the only thing between the network and every TCP endpoint of the
cluster (runtime/rpc.py), and it travels in gRPC metadata and in files. So:

* at least MIN_LENGTH characters: a short token can be guessed (ours are 64 hex
  characters, 256 random bits);
* printable ASCII without spaces (``!`` to ``~``): anything else breaks metadata,
  command lines or the token file in ways that look like authentication failures.

Errors never repeat the token: they end up in logs and terminals.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

__all__ = ["MIN_LENGTH", "TOKEN_ENV", "InvalidToken", "token_problem", "check_token",
           "read_token_file"]

MIN_LENGTH = 32
#: The variable agentctl join (and drivers, see runtime.api) take the token from.
TOKEN_ENV = "NODE_AGENT_TOKEN"
#: A token file larger than this is not a token file.
_MAX_FILE_BYTES = 64 * 1024


class InvalidToken(ValueError):
    """The cluster token is unusable; the message says why and what to do."""


def token_problem(token: str) -> Optional[str]:
    """Why token is not acceptable (without quoting it), or None when it is."""
    if len(token) < MIN_LENGTH:
        return (f"is {len(token)} characters long; a cluster token must be at least "
                f"{MIN_LENGTH}")
    for i, ch in enumerate(token):
        if not "!" <= ch <= "~":
            what = ("a space" if ch == " " else
                    "a control character" if ord(ch) < 32 or ord(ch) == 127 else
                    "a non-ASCII character")
            return (f"contains {what} (U+{ord(ch):04X}) at position {i + 1}; a cluster token "
                    f"must be printable ASCII without spaces")
    return None


def check_token(token: str, source: str) -> str:
    """token when acceptable; InvalidToken naming source ("--token", a file...) else."""
    problem = token_problem(token)
    if problem is not None:
        raise InvalidToken(f"the cluster token from {source} {problem} (use the token printed "
                           f"by `agentctl start --head`, or let the head create one)")
    return token


def read_token_file(path: str) -> str:
    """The token in path (surrounding whitespace, e.g. the final newline, dropped),
    checked. "-" reads standard input: how `agentctl up` hands a worker the token
    over ssh without putting it in any command line or file. OSError when the file
    cannot be read, InvalidToken when it holds no acceptable token."""
    if path == "-":
        raw = sys.stdin.buffer.read(_MAX_FILE_BYTES + 1)
        path = "standard input"
    else:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_FILE_BYTES + 1)
    if len(raw) > _MAX_FILE_BYTES:
        raise InvalidToken(f"{path} is larger than {_MAX_FILE_BYTES} bytes; it is not a token "
                           f"file")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidToken(f"the cluster token from {path} contains non-ASCII bytes; a "
                           f"cluster token must be printable ASCII without spaces") from None
    return check_token(text.strip(), path if path == "standard input" else os.path.abspath(path))
