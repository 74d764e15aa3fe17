"""Initial schema: subjects, campaigns, jobs, stage runs, artifacts, compute events.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str, *, now: bool = False) -> sa.Column:
    # sa.func.now(), not text('now()'): SQLite accepts the former (CURRENT_TIMESTAMP) only.
    if now:
        return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)
    return sa.Column(name, sa.DateTime(timezone=True), nullable=True)


def _status(table: str, name: str, *values: str) -> sa.Enum:
    return sa.Enum(
        *values, name=op.f(f"ck_{table}_{name}"), native_enum=False, create_constraint=True, length=20
    )


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column(
            "status",
            _status("campaigns", "campaign_status", "active", "completed", "cancelled"),
            nullable=False,
        ),
        _timestamp("created_at", now=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaigns")),
        sa.UniqueConstraint("name", name=op.f("uq_campaigns_name")),
    )
    op.create_table(
        "subjects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("external_ref", sa.String(length=200), nullable=True),
        sa.Column("reference_key", sa.String(length=1024), nullable=True),
        sa.Column("reference_sha256", sa.String(length=64), nullable=True),
        _timestamp("consent_given_at"),
        sa.Column("consent_reference", sa.Text(), nullable=True),
        _timestamp("retention_until"),
        _timestamp("purged_at"),
        _timestamp("created_at", now=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subjects")),
        sa.UniqueConstraint("external_ref", name=op.f("uq_subjects_external_ref")),
    )
    op.create_index(op.f("ix_subjects_retention_until"), "subjects", ["retention_until"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=True),
        sa.Column("subject_id", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("negative_prompt", sa.Text(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column(
            "status",
            _status(
                "jobs", "job_status", "pending", "running", "completed", "failed", "cancelled", "needs_review"
            ),
            nullable=False,
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("error_stage", sa.String(length=64), nullable=True),
        sa.Column("error_text", sa.Text(), nullable=True),
        sa.Column("needs_review", sa.Boolean(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _timestamp("created_at", now=True),
        _timestamp("started_at"),
        _timestamp("finished_at"),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaigns.id"], name=op.f("fk_jobs_campaign_id_campaigns"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["subject_id"], ["subjects.id"], name=op.f("fk_jobs_subject_id_subjects")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("campaign_id", "fingerprint", name=op.f("uq_jobs_campaign_id_fingerprint")),
    )
    op.create_index("ix_jobs_campaign_id_status", "jobs", ["campaign_id", "status"])
    op.create_index(op.f("ix_jobs_subject_id"), "jobs", ["subject_id"])
    op.create_index(
        "uq_jobs_fingerprint_no_campaign",
        "jobs",
        ["fingerprint"],
        unique=True,
        postgresql_where=sa.text("campaign_id IS NULL"),
        sqlite_where=sa.text("campaign_id IS NULL"),
    )
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=1024), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content_type", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("biometric", sa.Boolean(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("subject_id", sa.Integer(), nullable=True),
        sa.Column("campaign_id", sa.Integer(), nullable=True),
        _timestamp("created_at", now=True),
        _timestamp("deleted_at"),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaigns.id"],
            name=op.f("fk_artifacts_campaign_id_campaigns"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_artifacts_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["subject_id"],
            ["subjects.id"],
            name=op.f("fk_artifacts_subject_id_subjects"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artifacts")),
    )
    for column in ("campaign_id", "job_id", "key", "kind", "subject_id"):
        op.create_index(op.f(f"ix_artifacts_{column}"), "artifacts", [column])
    op.create_table(
        "compute_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("cache_key", sa.String(length=256), nullable=False),
        sa.Column("reused", sa.Boolean(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("campaign_id", sa.Integer(), nullable=True),
        _timestamp("created_at", now=True),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaigns.id"],
            name=op.f("fk_compute_events_campaign_id_campaigns"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_compute_events_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_compute_events")),
    )
    op.create_index("ix_compute_events_campaign_id_kind", "compute_events", ["campaign_id", "kind"])
    op.create_index(op.f("ix_compute_events_job_id"), "compute_events", ["job_id"])
    op.create_table(
        "stage_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(length=64), nullable=False),
        sa.Column(
            "status",
            _status("stage_runs", "stage_status", "running", "completed", "failed", "skipped"),
            nullable=False,
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        _timestamp("started_at", now=True),
        _timestamp("finished_at"),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("input_keys", sa.JSON(), nullable=False),
        sa.Column("output_keys", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("error_text", sa.Text(), nullable=True),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_stage_runs_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stage_runs")),
    )
    op.create_index("ix_stage_runs_job_id_stage", "stage_runs", ["job_id", "stage"])


def downgrade() -> None:
    # Indexes go with their tables; children before parents.
    for table in ("stage_runs", "compute_events", "artifacts", "jobs", "subjects", "campaigns"):
        op.drop_table(table)
