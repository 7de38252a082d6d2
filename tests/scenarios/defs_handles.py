"""Scenarios for the issue-3 handles codes (registered with @scenario())."""
