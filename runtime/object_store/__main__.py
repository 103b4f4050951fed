"""``python -m runtime.object_store``: run a node's object store process."""
from runtime.object_store.server import main

if __name__ == "__main__":
    main()
