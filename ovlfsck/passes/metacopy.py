"""Metacopy files and protattr (issue 3 items 7-8; being written)."""
