"""Scenarios for the issue-3 workdir codes (registered with @scenario())."""
