"""Backends other than the in-process loop; each is the only place its engine is imported."""
