"""What the test driver scripts share: reporting to the test through a JSON file."""
from __future__ import annotations

import json
import os


def write_result(path: str, data: dict) -> None:
    """Atomically, so the test polling for the file never reads half of it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)
