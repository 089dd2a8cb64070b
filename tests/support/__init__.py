"""Test-support helpers shared by the test suite."""
