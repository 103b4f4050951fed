"""System tests: the .deb on booted Debian 12 hosts (see conftest.py). A package, so
that its conftest is not mistaken for tests/conftest.py by `from conftest import`."""
