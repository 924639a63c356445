"""Verification: every candidate against the original model, and where they diverge."""
