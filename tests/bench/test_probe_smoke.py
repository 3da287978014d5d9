"""bench.probe --quick: a few cases of every family of the attack table against live processes on
loopback, so the probe keeps working. Cases owned by other branches' findings are excluded from
the quick set; every quick case must end as expected, with no crash, leak or hang."""

from __future__ import annotations

import pytest

from tests.bench.test_chaos_smoke import run_bench


@pytest.mark.timeout(400)
def test_probe_quick_refuses_every_attack_and_serves_the_controls() -> None:
    record = run_bench("bench.probe", "--quick", "--cases", timeout=380)
    assert record["bench"] == "probe"
    assert record["cases"] >= 15, record["cases"]
    assert record["crashed"] == record["leaked"] == record["hung"] == 0, record["failing"]
    assert record["failing"] == [], record["failing"]
    assert record["served"] >= 2  # the controls: a valid request and an allowed job work
    assert {"protobuf", "shapes", "bytes", "shm", "rest", "headers", "binds", "tokens", "spec", "yaml",
            "files"} <= set(record["families"])
    findings = {result["finding"] for result in record["results"]}
    assert {"#28.1", "#28.4", "#28.6", "#28.7", "#28.9", "#28.12"} <= findings
