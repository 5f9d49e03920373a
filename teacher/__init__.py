"""teacher package."""
