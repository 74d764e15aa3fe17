"""Prefect tasks: thin wrappers over plain functions that can be called and tested alone."""
