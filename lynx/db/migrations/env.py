"""Alembic environment for lynx, driven by ``lynx.db.migrate``, which hands over an open connection.

No alembic.ini and no URL here: the connection comes from ``LynxSettings`` via ``make_engine``.
"""

from alembic import context

from lynx.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run lynx migrations through `lynx db upgrade` or lynx.db.migrate, not bare alembic")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
