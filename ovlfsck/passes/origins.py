"""Origin file handles (issue 3 items 2-3; being written)."""
