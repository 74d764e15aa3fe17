"""Prefect flows: short compositions of tasks, readable as the architecture diagram."""
