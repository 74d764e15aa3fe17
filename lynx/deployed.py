"""Runs on a Prefect server's deployments, for the CLI: submit one, follow it until it ends.

``submit_campaign`` hands a campaign file to the ``lynx-campaign/campaign`` deployment. The workers
may run on other machines that do not have the operator's file or photos, so the photos are stored
first (content-addressed, the same keys the flow itself would give them, so erasure and retention
cover them as usual) and the campaign, with those keys in place of paths, is stored as an object
whose key is the run's ``campaign_file`` parameter.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lynx.errors import JobFailedError, ServiceUnavailableError

CAMPAIGN_DEPLOYMENT = "lynx-campaign/campaign"


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def flow_run_link(flow_run_id: Any) -> str | None:
    """The UI page of a flow run on the configured server (None when no UI address is known)."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


def has_deployment(name: str) -> bool:
    """Whether the configured Prefect server has deployment ``flow/deployment``."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except ObjectNotFound:
        return False
    except Exception as err:  # connection refused, timeouts: one line, not a traceback
        raise ServiceUnavailableError(f"Prefect server at {api_url()} did not answer: {err}") from None
    return True


def stage_campaign(path: Path) -> str:
    """Validate the campaign file here, store its local photos and the campaign (photos as store
    keys); returns the campaign's store key."""
    from lynx.campaign import load_campaign
    from lynx.settings import get_settings
    from lynx.store import open_store

    spec = load_campaign(path)  # one-line errors for a bad file before anything is submitted
    store = open_store(get_settings())

    def stored(photo: str) -> str:
        local = Path(photo)
        return store.put_file(local).key if local.is_absolute() and local.is_file() else photo

    data = spec.model_dump(mode="json", exclude_none=True)
    for subject in data["subjects"]:
        for field in ("photo", "photos"):
            value = subject.get(field)
            if isinstance(value, str):
                subject[field] = stored(value)
            elif isinstance(value, list):
                subject[field] = [stored(item) for item in value]
    text = yaml.safe_dump(data, sort_keys=False).encode()
    digest = hashlib.sha256(text).hexdigest()[:16]
    key = f"campaigns/{spec.name}/spec-{digest}.yaml"
    store.put_bytes(text, key=key, content_type="application/yaml")
    return key


def submit(deployment: str, parameters: dict[str, Any]) -> Any:
    """Create a flow run of ``deployment`` and return it at once (workers pick it up)."""
    from prefect.deployments import run_deployment

    return run_deployment(deployment, parameters=parameters, timeout=0)


def watch(flow_run_id: Any, *, interval: float = 2.0, echo: Callable[[str], None] = print) -> Any:
    """Follow a flow run until it reaches a final state, echoing each state change; returns its
    final state, and raises JobFailedError (one line) unless it is Completed."""
    from prefect import get_client

    seen = None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state
            label = state.name if state is not None else "Unknown"
            if label != seen:
                seen = label
                message = f": {state.message}" if state is not None and state.message else ""
                echo(f"{time.strftime('%H:%M:%S')} {run.name}: {label}{message}")
            if state is not None and state.is_final():
                if not state.is_completed():
                    reason = f": {state.message}" if state.message else ""
                    raise JobFailedError(f"flow run {run.name} ({run.id}) ended {label}{reason}")
                return state
            time.sleep(interval)
