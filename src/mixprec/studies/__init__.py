"""End-to-end precision studies."""
