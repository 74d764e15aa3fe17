"""Stage "submit": subjects, photos and job rows for a batch of requests, as job tickets.

Re-running the same requests finds the same jobs (a job is identified by subject, prompts and
settings): completed jobs are handed back as they are while their deliverables verify (else they
are failed and retried), failed and cancelled ones are retried with their attempt counter raised,
and a job left 'running' by a run that died (its process gone, or its flow run final in Prefect)
is retried too. A retried job whose decoded video an
earlier attempt stored goes straight to delivery (``lynx.ledger``). A subject
whose photo cannot be found still gets its jobs, failed at this stage with the reason, and a purged
subject's requests come back failed at this stage with the reason (no job is recorded for them), so
one bad row never stops a campaign. An erased subject's requests are refused the same way, whether or
not its jobs ran before the erasure. Settings a later stage would refuse (delivery, the quality
gate's recogniser) fail every job this run claims, here, before any GPU time is spent on videos
that cannot ship; they are checked only once a job is claimed (a re-run of finished jobs loads nothing).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NONE

from lynx import ledger
from lynx.db.models import JobStatus, Subject
from lynx.db.tracking import check_not_purged
from lynx.errors import (
    ConfigurationError,
    IllegalTransitionError,
    InputError,
    InvalidKeyError,
    LynxError,
    NotFoundError,
)
from lynx.jobs import GenerationRequest, JobTicket, SubjectSpec
from lynx.liveness import Owner
from lynx.settings import LynxSettings
from lynx.store import StoredObject, validate_key
from tasks.policy import retry_on_transient
from tasks.services import services
from tasks.tracking import close_open_stages, current_flow_run_id, run_stage

log = logging.getLogger(__name__)


def store_photo(photo: str) -> StoredObject:
    """Upload a local photo (content-addressed, so the same bytes are stored once) or find a stored one."""
    store = services().store
    path = Path(photo).expanduser()
    if path.is_file():
        return store.put_file(path)
    try:
        validate_key(photo)
        return store.stat(photo)
    except (InvalidKeyError, NotFoundError):
        raise InputError(
            f"photo {photo!r} is neither a readable file on this machine nor an object in the artifact store"
        ) from None


def photo_name(photo: str) -> str:
    """A photo as error messages name it: a local file by its name, a store key as it is."""
    path = Path(photo).expanduser()
    return path.name if path.is_file() else photo


def register_subject(spec: SubjectSpec) -> tuple[Subject, LynxError | None]:
    """The subject row (created, or found by id and given changed photos) and a photo problem."""
    tracker = services().tracker
    subject = tracker.find_subject(spec.id) if spec.id else None
    if subject is not None and (subject.purged_at is not None or subject.erased_at is not None):
        try:  # refused before uploading: the person's photos must not be stored again
            check_not_purged(subject)
        except InputError as err:
            return subject, err
    photos: list[StoredObject] = []
    problem: LynxError | None = None
    for photo in spec.photos:
        try:
            photos.append(store_photo(photo))
        except LynxError as err:
            problem = problem or err
    if problem is not None:
        photos = []
    if subject is None:
        try:
            subject = tracker.create_subject(
                spec.display_name,
                external_ref=spec.id,
                photos=photos,
                consent_reference=spec.consent_reference,
                retention_until=spec.retention_until,
            )
        except InputError:  # another run registered the same id a moment ago
            subject = tracker.find_subject(spec.id) if spec.id else None
            if subject is None:
                raise
    stored = [{"key": photo.key, "sha256": photo.sha256} for photo in photos]
    if photos and subject.photo_list != stored:
        subject = tracker.set_subject_photos(subject.id, photos)
    return subject, problem


def check_run_settings(settings: LynxSettings, *, candidates: bool = False) -> ConfigurationError | None:
    """What the later stages' settings would refuse, found now rather than after the GPU minutes:
    the delivery spec, and with the quality gate on or candidates to score (``candidates``), the
    recogniser the gate reads (loaded once here, the delivery stage finds it in the process cache)."""
    from lynx.media.spec import DeliverySpec

    try:
        DeliverySpec.from_settings(settings)
        if settings.quality_gate_threshold is not None or candidates:
            from lynx.evaluation.recognizers import cached_evaluation_models

            cached_evaluation_models(settings).resolve(settings.quality_gate_recognizer)
    except ConfigurationError as err:
        return err
    return None


def _owner(job_id: int, attempt: int) -> Literal["this run", "alive", "gone"]:
    """Who is working on a 'running' job: this flow run (a retried submit), another live run, or
    nobody. The run that claimed the job (its first stage row of the attempt) owns it: a GPU run it
    started is its business (it re-submits or fails that run's jobs). The owner is gone when its
    process on this machine is (``lynx.liveness``: known at once), or when Prefect calls its flow run
    final (Crashed included: the heartbeat automation marks a dead run so) or does not know it."""
    rows = [run for run in services().tracker.stage_runs(job_id) if run.attempt == attempt]
    if not rows:
        return "gone"
    claim = rows[0]
    if claim.flow_run_id is not None and claim.flow_run_id == current_flow_run_id():
        return "this run"
    owner = Owner.parse(claim.owner)
    if owner is not None and owner.local and not owner.alive():
        return "gone"
    if claim.flow_run_id is None:  # claimed outside any flow run: nothing is working on it any more
        return "gone"
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(claim.flow_run_id).state
    except Exception:  # unknown to this Prefect server
        # its process lives on this machine: trust it; elsewhere nobody here can tell, take it over
        return "alive" if owner is not None and owner.local else "gone"
    return "gone" if state is None or state.is_final() else "alive"


def _claim(job_id: int) -> tuple[bool, JobStatus, int]:
    """Take the job for this run if it should run (again): returns (claimed, status, attempt).

    Failed and cancelled jobs are retried (attempt + 1), a job whose run died is failed and
    retried, a job this very run already claimed (the submit task is being retried) stays ours;
    completed jobs and jobs another live run works on are left alone.
    """
    tracker = services().tracker
    job = tracker.get_job(job_id)
    if job.status is JobStatus.RUNNING:
        owner = _owner(job.id, job.attempt)
        if owner == "this run":
            return True, job.status, job.attempt
        if owner == "gone":
            text = "the run working on this job ended without finishing it (worker lost)"
            close_open_stages(job.id, text)
            job = tracker.transition_job(job.id, JobStatus.FAILED, error_stage="submit", error_text=text)
    if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        job = tracker.transition_job(job.id, JobStatus.PENDING)
    if job.status is JobStatus.PENDING:
        try:
            job = tracker.transition_job(job.id, JobStatus.RUNNING)
            return True, job.status, job.attempt
        except IllegalTransitionError:  # another run claimed it a moment ago
            job = tracker.get_job(job.id)
    return False, job.status, job.attempt


def reopen_if_undelivered(job_id: int) -> None:
    """A completed or held job whose deliverables no longer verify is failed (``lynx.ledger``), so
    that it is claimed and delivered again like any failed job."""
    svc = services()
    ledger.reopen_undelivered(svc.tracker, svc.store, job_id, how=svc.settings.ledger_verify)


def with_stored_video(ticket: JobTicket, recorder: Any) -> JobTicket:
    """The claimed job's ticket, carrying its decoded video if an earlier attempt stored one that
    still verifies: the job then goes straight to delivery, no GPU stage runs for it."""
    svc = services()
    # read in full whatever LYNX_LEDGER_VERIFY says: delivery downloads it next anyway, and a damaged
    # intermediate trusted here would fail every later re-run at deliver instead of being made again
    video = ledger.stored_video(svc.tracker, svc.store, ticket.job_id, how="checksum")
    if video is None:
        return ticket
    log.info("job %s: its decoded video %s verifies, delivering it", ticket.job_id, video.intermediate_key)
    recorder.metrics["decoded_earlier"] = video.intermediate_key
    return ticket.model_copy(update={"video": video})


def register_job(
    request: GenerationRequest,
    subject: Subject,
    problem: LynxError | None,
    campaign_id: int | None,
    misconfigured: Callable[[bool], ConfigurationError | None],
) -> JobTicket:
    """The job's ticket: running and recorded in stage 'submit', or what an earlier run left.

    ``misconfigured`` is what the later stages' settings refuse (for a job with candidates to score,
    or not), asked only for a claimed job.
    """
    tracker = services().tracker
    settings = request.settings
    if subject.erased_at is not None:  # not even its earlier jobs: what they made may be gone too
        erased = problem or InputError(f"subject {subject.ref} was erased")
        return refused(request, subject, campaign_id, erased)
    try:
        job, _ = tracker.get_or_create_job(
            subject_id=subject.id,
            prompt=request.prompt,
            params=settings.job_params(),
            negative_prompt=settings.negative_prompt,
            campaign_id=campaign_id,
        )
    except InputError as err:  # a purged subject gets no new job
        return refused(request, subject, campaign_id, err)
    reopen_if_undelivered(job.id)
    claimed, status, attempt = _claim(job.id)
    ticket = JobTicket(
        job_id=job.id,
        attempt=attempt,
        subject_id=subject.id,
        subject_ref=subject.external_ref or f"subject-{subject.id}",
        campaign_id=campaign_id,
        campaign=request.campaign,
        prompt=request.prompt,
        settings=settings,
        photo_keys=[photo["key"] for photo in subject.photo_list],
        photo_names=[photo_name(photo) for photo in request.subject.photos],
    )
    if not claimed:  # completed (or in review) earlier, or running in another live run
        return ticket.model_copy(update={"status": status.value})

    def check_inputs(recorder: Any) -> JobTicket:
        error = misconfigured(settings.candidates > 1) or problem
        if error is not None:
            raise error
        return with_stored_video(ticket, recorder)

    return run_stage(ticket, "submit", check_inputs, inputs=ticket.photo_keys)


def refused(
    request: GenerationRequest, subject: Subject | None, campaign_id: int | None, err: LynxError
) -> JobTicket:
    """A failed ticket, stage 'submit', for a request no job could be recorded for."""
    log.warning("refused %r for subject %s: %s", request.prompt, request.subject.id or "(new)", err)
    if subject is not None:
        subject_ref = subject.external_ref or f"subject-{subject.id}"
    else:
        subject_ref = request.subject.id or request.subject.display_name
    return JobTicket(
        job_id=None,
        attempt=0,
        subject_id=subject.id if subject else None,
        subject_ref=subject_ref,
        campaign_id=campaign_id,
        campaign=request.campaign,
        prompt=request.prompt,
        settings=request.settings,
    ).as_failed("submit", str(err))


def submit_requests(
    requests: list[GenerationRequest], campaign_spec: dict[str, Any] | None = None
) -> list[JobTicket]:
    """Register every request's subject (once per subject) and job; returns one ticket per request."""
    tracker = services().tracker
    names = {request.campaign for request in requests}
    if len(names) > 1:
        raise InputError(f"one submission belongs to one campaign, got {sorted(map(str, names))}")
    name = names.pop() if names else None
    campaign_id = tracker.get_or_create_campaign(name, spec=campaign_spec).id if name else None

    @functools.cache  # checked once, when the first job is claimed: a re-run of done jobs loads nothing
    def misconfigured(candidates: bool) -> ConfigurationError | None:
        err = check_run_settings(services().settings, candidates=candidates)
        if err is not None:
            log.error("jobs fail at submit, settings of a later stage are invalid: %s", err)
        return err

    tickets = []
    for subject_spec, group in itertools.groupby(requests, key=lambda request: request.subject):
        subject_requests = list(group)
        try:
            subject, problem = register_subject(subject_spec)
        except InputError as err:  # this subject's requests fail, the others go on
            tickets += [refused(request, None, campaign_id, err) for request in subject_requests]
            continue
        tickets += [
            register_job(request, subject, problem, campaign_id, misconfigured)
            for request in subject_requests
        ]
    return tickets


@task(name="submit", cache_policy=NONE, retry_condition_fn=retry_on_transient)
def submit_jobs(
    requests: list[GenerationRequest], campaign_spec: dict[str, Any] | None = None
) -> list[JobTicket]:
    """Prefect task over ``submit_requests``."""
    return submit_requests(requests, campaign_spec)
