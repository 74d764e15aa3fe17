"""Flow ``lynx-bench``: a subjects x prompts protocol generated and evaluated end to end.

The protocol is a campaign file (``lynx.evaluation.bench`` writes it); both steps are the real
flows, run as subflows, so the benchmark measures exactly what production runs.
"""

from __future__ import annotations

import time

from prefect import flow

from flows.campaign import lynx_campaign
from flows.evaluate import lynx_eval
from lynx.evaluation.bench import BenchOutcome
from tasks.states import outcomes_of


@flow(name="lynx-bench", log_prints=True)
def lynx_bench(campaign_file: str, name: str, report_dir: str | None = None) -> BenchOutcome:
    """Generate every job of ``campaign_file`` (campaign ``name``), then evaluate them."""
    started = time.monotonic()
    # Step 1: every subject x prompt through the campaign flow (completed jobs of a re-run are kept;
    # a campaign with failed jobs ends Failed, its outcomes are still benchmarked).
    jobs = outcomes_of(lynx_campaign(campaign_file, return_state=True))
    generated = time.monotonic()
    # Step 2: identity metrics and the report for the campaign's delivered videos.
    evaluation = lynx_eval(campaign=name, report_dir=report_dir)
    return BenchOutcome.of(
        name,
        jobs,
        evaluation,
        generation_seconds=generated - started,
        evaluation_seconds=time.monotonic() - generated,
    )
