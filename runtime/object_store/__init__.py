"""The per-node shared-memory object store.

Values larger than the inline limit live in one file per object under a shared
memory directory (``/dev/shm``). Clients write those files and map them read-only
themselves, so a value crosses process boundaries without a copy; the store
process (``python -m runtime.object_store``) only does the accounting, spills
sealed objects to disk when memory runs out, restores them on demand and frees them.

Modules:

* ``store``  - the accounting and spill policy, no sockets, no event loop.
* ``server`` - the store process: the async service, its gRPC servicer, ``main()``.
* ``client`` - ``StoreClient`` (asyncio gRPC) and the ``write_object`` /
  ``map_object`` helpers that touch the object files directly.
* ``transfer`` - moving objects between nodes: each store serves its objects on a
  transfer port and pulls other stores' objects into its own memory (``Pull``).
"""
from runtime.object_store.client import StoreClient, map_object, write_object

__all__ = ["StoreClient", "map_object", "write_object"]
