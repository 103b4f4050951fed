"""docs/compatibility.md is what scripts/compat.py generates from the committed list of
Ray 2.60's public names (scripts/ray_api_2.60.json) and the runtime as it is now: a
public name added, removed or changed without regenerating the document fails here.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.env import scrubbed_env

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "compat.py"


@pytest.fixture(scope="module")
def compat():
    spec = importlib.util.spec_from_file_location("compat", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_document_is_up_to_date():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=REPO,
                          env=scrubbed_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_listed_module_and_name_is_in_the_document(compat):
    api = json.loads((REPO / "scripts" / "ray_api_2.60.json").read_text())
    assert api["ray_version"].startswith("2.60")
    doc = (REPO / "docs" / "compatibility.md").read_text()
    for ray_module, _ in compat.MODULES:
        assert f"## `{ray_module}` → " in doc
        for name in api["modules"][ray_module]:
            assert f"| `{name}` |" in doc, (ray_module, name)
    # The names issue 14 asks for are all there.
    for name in ("ActorPool", "as_completed", "map_unordered", "list_named_actors"):
        assert name in api["modules"]["ray.util"]


def test_status_rules(compat):
    import runtime

    missing = compat.status_of("ray", "no_such_name", {"kind": "function"}, runtime)
    assert missing == (compat.NOT_SUPPORTED, "")
    fewer = compat.status_of("ray", "kill", {"kind": "function", "params": {
        "names": ["actor", "no_restart", "brand_new"], "varargs": False, "varkw": False}},
        runtime)
    assert fewer == (compat.DIFFERS, "no parameter `brand_new`")
    same = compat.status_of("ray", "kill", {"kind": "function", "params": {
        "names": ["actor", "no_restart", "_private"], "varargs": False, "varkw": False}},
        runtime)
    assert same == (compat.SUPPORTED, "")
    noted = compat.status_of("ray.util", "ActorPool", {"kind": "class"},
                             importlib.import_module("runtime.util"))
    assert noted[0] == compat.DIFFERS and "busy" in noted[1]


def test_a_note_for_a_name_ray_lacks_is_an_error(compat, monkeypatch):
    api = json.loads((REPO / "scripts" / "ray_api_2.60.json").read_text())
    assert compat._check_notes(api) == []
    monkeypatch.setitem(compat.NOTES, "ray:not_a_ray_name", (compat.DIFFERS, "x"))
    assert compat._check_notes(api) == [
        f"NOTES has 'ray:not_a_ray_name', which Ray {api['ray_version']} does not have"]
