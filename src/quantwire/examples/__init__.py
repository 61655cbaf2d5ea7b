"""Small end-to-end examples that ship with quantwire (used by the demo, benchmarks and tests)."""
