"""Prefect automations of lynx: dead flow runs marked Crashed, failures notified.

    python -m deployments.automations            # what `deployments/start-workers.sh setup` runs

1. ``lynx: crash runs without heartbeats`` (Prefect's zombie-run recipe): a lynx flow run (tag
   ``lynx``) emits ``prefect.flow-run.heartbeat`` every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds
   (set in the work-pool templates and prefect.yaml; Prefect keeps it at 30 s or more). When a
   heartbeat is followed by neither another heartbeat nor a final state within
   LYNX_HEARTBEAT_WINDOW_SECONDS (default 90), the run's process or machine is gone: the run is set
   Crashed. The flow waiting for a GPU run sees that at its next poll and re-submits the unfinished
   jobs (``tasks.gpu.run_on_gpu_pool``); a re-run sees the crashed owner and takes its jobs over.
2. ``lynx: re-run crashed campaigns``: a campaign run (deployments tagged ``lynx-rerun``) that
   ends Crashed (its CPU worker or machine died, so the run's own process is gone and nothing waits
   for it) is run again from the same deployment with the same parameters and ``reruns`` + 1; the
   re-run skips finished work, takes the dead run's jobs over (their owner is gone) and delivers
   them from their stored videos. A run that is past LYNX_CAMPAIGN_RERUN_ATTEMPTS (default 2) ends
   Failed at once naming the setting, so a campaign that keeps crashing stops being re-run.
3. ``lynx: notify failed or crashed runs``, only when LYNX_NOTIFY_BLOCK names a notification block
   as ``block-type/block-name`` (e.g. ``slack-webhook/lynx-alerts``, made in the UI or with
   ``prefect block create``): a message for every lynx flow run that ends Failed or Crashed, with the
   state's message (the failed jobs' reason). Without the setting no notification automation exists.

Both are created, or updated in place when they exist (matched by name): running it again is safe.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, RunDeployment, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

from lynx.errors import ConfigurationError
from lynx.settings import LynxSettings, get_settings

log = logging.getLogger(__name__)

CRASH_NAME = "lynx: crash runs without heartbeats"
RERUN_NAME = "lynx: re-run crashed campaigns"
RERUN_TAG = "lynx-rerun"  # tag of the deployments whose crashed runs are run again (prefect.yaml)
NOTIFY_NAME = "lynx: notify failed or crashed runs"
TAG = "lynx"  # every lynx deployment's tag (prefect.yaml); flow runs carry it as a related resource

_FLOW_RUNS = ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"})
_LYNX_RUNS = ResourceSpecification(
    {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"}
)


def crash_automation(window_seconds: int) -> Automation:
    final = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    return Automation(
        name=CRASH_NAME,
        description=f"A {TAG} flow run without a heartbeat for {window_seconds} s is marked Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *final},
            match=_FLOW_RUNS,
            match_related=_LYNX_RUNS,
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=window_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {window_seconds} s: its process or machine is gone",
            )
        ],
    )


def rerun_automation() -> Automation:
    """A crashed ``lynx-rerun`` run is run again: same deployment (inferred from the event), same
    campaign parameters, ``reruns`` one higher (the flow refuses to go past its limit)."""
    return Automation(
        name=RERUN_NAME,
        description=f"A {RERUN_TAG} flow run that ends Crashed is run again (the re-run resumes its work).",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match=_FLOW_RUNS,
            match_related=ResourceSpecification(
                {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{RERUN_TAG}"}
            ),
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            RunDeployment(
                source="inferred",
                parameters={
                    # one expression each: Prefect renders it as JSON, so None stays null
                    "campaign_file": "{{ flow_run.parameters.get('campaign_file') }}",
                    "name": "{{ flow_run.parameters.get('name') }}",
                    "reruns": "{{ ((flow_run.parameters.get('reruns') or 0) + 1) }}",
                },
            )
        ],
    )


def notify_automation(block_document_id) -> Automation:
    return Automation(
        name=NOTIFY_NAME,
        description=f"A message for every {TAG} flow run that ends Failed or Crashed.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match=_FLOW_RUNS,
            match_related=_LYNX_RUNS,
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            SendNotification(
                block_document_id=block_document_id,
                subject="lynx: flow run {{ flow_run.name }} ended {{ flow_run.state.name }}",
                body="Flow run {{ flow_run.name }} ({{ flow.name }}) ended {{ flow_run.state.name }}: "
                "{{ flow_run.state.message }}",
            )
        ],
    )


def notification_block_id(name: str):
    """The id of the notification block named ``type/name`` (LYNX_NOTIFY_BLOCK)."""
    from prefect.blocks.core import Block

    if "/" not in name:
        raise ConfigurationError(
            f"notification block {name!r} must be named as block-type/block-name "
            "(e.g. slack-webhook/lynx-alerts)",
            setting="LYNX_NOTIFY_BLOCK",
        )
    try:
        block = Block.load(name)
    except (ValueError, KeyError) as err:
        raise ConfigurationError(
            f"notification block {name!r} not found on the Prefect server: {err}", setting="LYNX_NOTIFY_BLOCK"
        ) from None
    return block._block_document_id


def apply(automation: Automation) -> Automation:
    """Create the automation, or update the one of the same name (idempotent)."""
    try:
        existing = Automation.read(name=automation.name)
    except ValueError:
        return automation.create()
    updated = automation.model_copy(update={"id": existing.id})
    updated.update()
    return updated


def ensure_automations(settings: LynxSettings | None = None) -> list[Automation]:
    """The crash and campaign re-run automations, and the notification one when LYNX_NOTIFY_BLOCK is set."""
    settings = settings or get_settings()
    made = [apply(crash_automation(settings.heartbeat_window_seconds)), apply(rerun_automation())]
    if settings.notify_block:
        made.append(apply(notify_automation(notification_block_id(settings.notify_block))))
    return made


def main() -> None:
    settings = get_settings()
    for automation in ensure_automations(settings):
        print(f"automation {automation.name!r}: {automation.id}")
    if not settings.notify_block:
        print(
            "no notification automation: set LYNX_NOTIFY_BLOCK=block-type/block-name (a notification block "
            "made in the UI or with `prefect block create`) and run setup again"
        )


if __name__ == "__main__":
    main()
