"""Scenarios for the issue-3 index codes (registered with @scenario())."""
