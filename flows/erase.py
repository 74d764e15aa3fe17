"""Flow ``lynx-erase`` (deployment ``lynx-erase/erase``): a subject erased on request, with a receipt.

    prefect deployment run lynx-erase/erase --param subject=alice [--param with_deliverables=true]

Removes the subject's photos and everything derived from them, across every campaign, from the
artifact store and the tracking database (``lynx.erasure``), and leaves a receipt (no biometric
content) in both and as a markdown artifact. Re-running it is safe: it finishes an erasure a crash
interrupted, and otherwise says there was nothing left. ``lynx subject erase ID --yes`` does the
same from the command line.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from lynx.erasure import ErasureReceipt
from lynx.evaluation.publish import slug
from lynx.settings import get_settings
from tasks.erase import erase
from tasks.policy import retry_delays


def _run_name() -> str:
    return f"erase-{slug(str(flow_run.parameters.get('subject') or 'subject'))}"


@flow(name="lynx-erase", flow_run_name=_run_name, log_prints=True)
def lynx_erase(subject: str, with_deliverables: bool = False) -> ErasureReceipt:
    """Erase ``subject`` (its id, or ``subject-N``); ``with_deliverables`` also removes its videos."""
    settings = get_settings()
    # Step 1: objects, rows and fields derived from the subject's photos, then the receipt.
    # No timeout: a subject's objects may be many; every step is safe to repeat (retries).
    erase_now = erase.with_options(
        retries=settings.task_retries, retry_delay_seconds=retry_delays(settings) or 0
    )
    return erase_now(subject, with_deliverables)
