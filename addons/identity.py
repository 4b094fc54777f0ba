"""Identity addon (work in progress)."""
