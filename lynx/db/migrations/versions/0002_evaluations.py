"""Evaluations: identity metrics per video, reference photo, recogniser and frame stride.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("video", sa.String(length=1024), nullable=False),
        sa.Column("video_sha256", sa.String(length=64), nullable=False),
        sa.Column("reference_sha256", sa.String(length=64), nullable=False),
        sa.Column("recognizer", sa.String(length=200), nullable=False),
        sa.Column("stride", sa.Integer(), nullable=False),
        sa.Column("mean", sa.Float(), nullable=True),
        sa.Column("std", sa.Float(), nullable=True),
        sa.Column("min", sa.Float(), nullable=True),
        sa.Column("max", sa.Float(), nullable=True),
        sa.Column("frames_sampled", sa.Integer(), nullable=False),
        sa.Column("frames_with_face", sa.Integer(), nullable=False),
        sa.Column("face_share", sa.Float(), nullable=False),
        sa.Column("per_frame", sa.JSON(), nullable=False),
        sa.Column("setup", sa.JSON(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=True),
        # sa.func.now(), not text('now()'): SQLite accepts the former (CURRENT_TIMESTAMP) only.
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_evaluations_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
        sa.UniqueConstraint(
            "video_sha256", "reference_sha256", "recognizer", "stride",
            name=op.f("uq_evaluations_video_sha256_reference_sha256_recognizer_stride"),
        ),
    )
    op.create_index(op.f("ix_evaluations_job_id"), "evaluations", ["job_id"])


def downgrade() -> None:
    op.drop_table("evaluations")
