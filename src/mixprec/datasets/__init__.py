"""Dataset loaders: find local copies, validate every byte, never commit data."""
