"""The workdir (issue 3 item 6; being written)."""
