"""Task "erase-subject": a subject's data erased on request (``lynx.erasure``), with a receipt artifact.

A thin shell over ``erase_subject``: every step of it is safe to repeat, so a transient storage
or database error is simply retried, and a run that died is finished by the next one.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from lynx.erasure import ErasureReceipt, erase_subject
from lynx.evaluation.publish import artifact_key
from tasks.policy import retry_on_transient
from tasks.services import services
from tasks.tracking import current_flow_run_id


def receipt_markdown(receipt: ErasureReceipt) -> str:
    """The receipt as the Prefect UI shows it: counts and where the full receipt is."""
    kinds = "\n".join(f"| {kind} | {count} |" for kind, count in receipt.removed_by_kind.items())
    return (
        f"# Erasure of subject {receipt.subject}\n\n"
        f"Requested {receipt.requested_at:%Y-%m-%d %H:%M} UTC, finished "
        f"{receipt.finished_at:%Y-%m-%d %H:%M} UTC"
        + (" (nothing was left to erase)" if receipt.already_erased else "")
        + f".\n\n{receipt.objects_removed} objects removed ({receipt.removed_bytes} bytes), "
        f"{len(receipt.kept_deliverables)} deliverables kept"
        f"{'' if receipt.with_deliverables else ' (not asked to erase them)'}, "
        f"{len(receipt.kept_shared)} objects kept as another subject's.\n\n"
        f"| removed kind | objects |\n| --- | --- |\n{kinds}\n\n"
        f"Receipt: `{receipt.receipt_key}`\n"
    )


@task(name="erase-subject", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def erase(subject: str, with_deliverables: bool = False) -> ErasureReceipt:
    """Erase the subject's objects and rows (finishing an erasure a crash interrupted); the receipt."""
    svc = services()
    receipt = erase_subject(
        svc.settings,
        subject,
        with_deliverables=with_deliverables,
        tracker=svc.tracker,
        store=svc.store,
        flow_run_id=current_flow_run_id(),
    )
    create_markdown_artifact(
        receipt_markdown(receipt),
        key=artifact_key("erasure", receipt.subject),
        description=f"Erasure receipt of subject {receipt.subject}",
    )
    return receipt
