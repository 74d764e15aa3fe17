"""Deleting biometric data when a subject's retention ends.

For every subject whose ``retention_until`` has passed and that is not purged yet: delete the
objects of its biometric artifacts (reference photo, face crops, embeddings, reference features,
identity tokens, sampling checkpoints of unfinished videos) from the store, mark those rows deleted
and set ``subject.purged_at``. Outputs (videos, previews, reports) are not biometric data and stay.

Order matters for crash safety: objects go first, rows are marked after, so an interrupted purge
leaves the subject unpurged and the next run finishes the job (deleting a missing object is fine).
An object that is also recorded for another subject (content-addressed keys are shared by identical
bytes) is kept for that subject; only this subject's rows are marked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from lynx.db.models import utcnow
from lynx.db.tracking import Tracker
from lynx.settings import LynxSettings
from lynx.store import ArtifactStore, open_store

log = logging.getLogger(__name__)


@dataclass
class SubjectPurge:
    subject_id: int
    name: str
    retention_until: datetime | None
    deleted_keys: list[str] = field(default_factory=list)
    shared_keys: list[str] = field(default_factory=list)  # still recorded for someone else: kept
    bytes_deleted: int = 0


@dataclass
class PurgeReport:
    now: datetime
    dry_run: bool
    subjects: list[SubjectPurge] = field(default_factory=list)

    @property
    def objects_deleted(self) -> int:
        return sum(len(s.deleted_keys) for s in self.subjects)

    @property
    def bytes_deleted(self) -> int:
        return sum(s.bytes_deleted for s in self.subjects)


def purge_expired(
    settings: LynxSettings,
    now: datetime | None = None,
    *,
    dry_run: bool = False,
    tracker: Tracker | None = None,
    store: ArtifactStore | None = None,
) -> PurgeReport:
    """Purge the biometric data of every subject whose retention ended before ``now``.

    ``dry_run`` reports what would be deleted and changes nothing.
    """
    now = now or utcnow()
    own_tracker = tracker is None
    tracker = tracker or Tracker.from_settings(settings)
    store = store or open_store(settings)
    report = PurgeReport(now=now, dry_run=dry_run)
    try:
        expired = tracker.expired_subjects(now)
        if expired and not dry_run:
            store.check()  # fail before touching anything if the store is unreachable
        for subject in expired:
            report.subjects.append(_purge_subject(tracker, store, subject, now, dry_run))
    finally:
        if own_tracker:
            tracker.close()
    return report


def _purge_subject(
    tracker: Tracker, store: ArtifactStore, subject, now: datetime, dry_run: bool
) -> SubjectPurge:
    rows = tracker.list_artifacts(subject_id=subject.id)
    biometric = [row for row in rows if row.biometric]
    keys = sorted(
        {row.key for row in biometric} | ({subject.reference_key} if subject.reference_key else set())
    )
    shared = tracker.live_keys_outside(keys, subject.id)
    sizes = {row.key: row.size for row in biometric}
    result = SubjectPurge(subject.id, subject.name, subject.retention_until, shared_keys=sorted(shared))
    for key in keys:
        if key in shared:
            continue
        result.deleted_keys.append(key)
        result.bytes_deleted += sizes.get(key, 0)
        if not dry_run:
            store.delete(key)
    if not dry_run:
        tracker.mark_subject_purged(subject.id, [row.id for row in biometric], now)
        log.info(
            "purged subject %s: %d objects deleted, %d kept (shared)",
            subject.id,
            len(result.deleted_keys),
            len(shared),
        )
    return result
