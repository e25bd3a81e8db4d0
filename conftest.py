"""Makes the repository root importable in tests (for `configs`)."""
