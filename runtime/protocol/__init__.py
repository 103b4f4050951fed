"""Generated gRPC/protobuf code for the runtime's wire protocol.

The ``*_pb2*.py`` modules here are produced from ``protos/runtime/protocol/*.proto``
by ``python runtime/_protocol_build.py`` (run by ``.ci/run`` and the README's
set-up); they are never edited or committed. Importing this package builds them on
first use when they are missing or older than their ``.proto`` sources, so a source
checkout works even if the build step was skipped.
"""
from runtime._protocol_build import ensure_built as _ensure_built

_ensure_built()
