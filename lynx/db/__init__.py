"""Run tracking: SQLAlchemy models, engine/session setup, migrations and the ``Tracker`` service."""
