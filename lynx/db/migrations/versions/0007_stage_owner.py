"""Owner of a stage row (host:pid:process start): a re-run tells at once that its process is gone.

Revision ID: 0007
Revises: 0006_subjects
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006_subjects"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER a table in place (a no-op wrapper on PostgreSQL)
    with op.batch_alter_table("stage_runs") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stage_runs") as batch:
        batch.drop_column("owner")
