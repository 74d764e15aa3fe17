"""Subjects with several photos, and erasure on request: subjects.photos, subjects.erased_at, erasures.

Revision ID: 0006_subjects
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_subjects"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER a table in place (a no-op wrapper on PostgreSQL)
    with op.batch_alter_table("subjects") as batch:
        batch.add_column(sa.Column("photos", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "erasures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("subject_id", sa.Integer(), nullable=False),
        sa.Column("subject_ref", sa.String(length=200), nullable=False),
        sa.Column("with_deliverables", sa.Boolean(), nullable=False),
        sa.Column("planned", sa.JSON(), nullable=False),
        sa.Column("receipt", sa.JSON(), nullable=False),
        sa.Column("receipt_key", sa.String(length=1024), nullable=True),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        # sa.func.now(), not text('now()'): SQLite accepts the former (CURRENT_TIMESTAMP) only.
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["subject_id"], ["subjects.id"], name=op.f("fk_erasures_subject_id_subjects")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_erasures")),
    )
    op.create_index(op.f("ix_erasures_subject_id"), "erasures", ["subject_id"])


def downgrade() -> None:
    op.drop_table("erasures")
    with op.batch_alter_table("subjects") as batch:
        batch.drop_column("erased_at")
        batch.drop_column("photos")
