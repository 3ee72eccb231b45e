"""Bluesky callbacks: live phase mapping and result writing (PhaseMapCallback, issue #3)."""
