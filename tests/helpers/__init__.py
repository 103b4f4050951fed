"""Importable helper modules for the tests (tests/ is on the driver's sys.path)."""
