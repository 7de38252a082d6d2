"""Scenarios for the issue-3 metacopy codes (registered with @scenario())."""
