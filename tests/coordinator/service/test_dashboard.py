"""The coordinator's web dashboard, seen as a person sees it: in a real headless Chromium.

A real service (`coordinator serve --http-port 0`) runs a small job with two poisoned rows on a
real model server; Chromium (Debian's package, `make browser`) loads the page, runs its script,
and the test reads the DOM it rendered: the job's row and final state, the chart, the failed
rows, the server. A screenshot is kept under test-artifacts/dashboard/ (the path is printed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest

from tensorfleet.client import ConnectionOptions
from tensorfleet.client.coordinator_client import job_state
from tests.coordinator.helpers import MODELS, REPO_ROOT, make_fasta, write_job
from tests.serving import running_server

from .helpers import running_coordinator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO_ROOT / "test-artifacts" / "dashboard"
TOKEN = "dash-token-42"
READ_TOKEN = "dash-read-token-7"
POISON = {5, 77}


def chromium(url: str, *mode: str) -> subprocess.CompletedProcess:
    """One headless Chromium run on a fresh profile; --virtual-time-budget lets scripts finish."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="tf-chromium-") as profile:
        command = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--window-size=1200,1000", *mode, url,
        ]
        return subprocess.run(command, capture_output=True, timeout=120, check=False)


class Page(HTMLParser):
    """What the rendered DOM shows: job rows, the chart's attributes and shapes, table texts."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.jobs: dict[str, str] = {}
        self.chart: dict[str, str] | None = None
        self.shapes: list[str] = []
        self.text: list[str] = []
        self._in_chart = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if tag == "tr" and "data-job-id" in attributes:
            self.jobs[attributes["data-job-id"]] = attributes.get("data-state", "")
        if tag == "svg" and attributes.get("id") == "rows-chart":
            self.chart, self._in_chart = attributes, True
        elif self._in_chart and tag in ("polyline", "rect"):
            self.shapes.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._in_chart = False

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.text.append(data.strip())


def _get(url: str, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make browser installs it as root)")
def test_dashboard_in_headless_chromium(tmp_path) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    make_fasta(folder / "in.fasta", 300, seed=3, poison=POISON)
    with running_server(MODELS) as server:
        job_file = write_job(
            folder / "job.yaml", input={"path": "in.fasta"}, model={"name": "embed", "servers": [server.address]},
            output={"path": "out.h5"}, chunking={"chunk_rows": 16, "batch_rows": 8}, policy={"window": 2},
        )
        port_file = tmp_path / "http-port"
        read_token_file = tmp_path / "read-token"
        read_token_file.write_text(READ_TOKEN)
        with running_coordinator(
            tmp_path / "state", "--http-port", "0", "--http-port-file", str(port_file),
            "--servers", server.address, "--token", TOKEN, "--read-token-file", str(read_token_file),
        ) as coordinator, coordinator.client(options=ConnectionOptions(token=TOKEN)) as client:
            job = client.submit(job_file)
            final = client.wait(job.job_id)
            assert job_state(final) == "SUCCEEDED" and final.rows_failed == len(POISON), coordinator.log()
            base = f"http://127.0.0.1:{port_file.read_text().strip()}"

            # The JSON behind the page needs the token; the page itself carries no data.
            status, body = _get(f"{base}/api/jobs")
            assert status == 401 and "bearer token" in body["error"]
            for token in (TOKEN, READ_TOKEN):  # the submit token may read too
                status, body = _get(f"{base}/api/jobs", token)
                assert status == 200 and [j["job_id"] for j in body["jobs"]] == [job.job_id]
            status, body = _get(f"{base}/api/jobs/no-such-job", TOKEN)
            assert status == 404 and "no-such-job" in body["error"]

            url = f"{base}/#token={READ_TOKEN}"
            dumped = chromium(url, "--dump-dom")
            assert dumped.returncode == 0, dumped.stderr.decode(errors="replace")[-2000:]
            page = Page(dumped.stdout.decode())
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "dashboard.png"
            shot.unlink(missing_ok=True)
            taken = chromium(url, f"--screenshot={shot}")
            print(f"dashboard screenshot: {shot}")

            refused = Page(chromium(base + "/", "--dump-dom").stdout.decode())  # no token in the address

    assert page.jobs == {job.job_id: "SUCCEEDED"}, page.text[:40]
    assert page.chart is not None and int(page.chart["data-points"]) >= 2, page.chart
    assert "polyline" in page.shapes and "rect" in page.shapes, page.shapes
    text = " ".join(page.text)
    assert "300/300" in text and "Failed rows (2)" in text
    assert "seq5" in text and "seq77" in text and "poison row" in text  # the failed rows with their errors
    assert server.address in text and "up" in page.text and "embed READY" in text
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr.decode(errors="replace")[-2000:]
    assert refused.jobs == {} and any("401" in t and "#token=" in t for t in refused.text), refused.text


def test_history_is_rows_done_and_rate_per_step() -> None:
    """Chunks of 10 rows committed at t=1..4 after a start at t=0: rows done climbs to 40, and
    each step's rate is the rows committed in it over its width."""
    from tensorfleet.coordinator.service.dashboard import history

    points = history([(1.0, 10, 0), (2.0, 10, 0), (3.0, 10, 1), (4.0, 10, 0)], since=0.0)
    assert [p["time"] for p in points] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [p["rows_done"] for p in points] == [0, 10, 20, 30, 40]
    assert [p["rows_per_second"] for p in points] == [0.0, 10.0, 10.0, 10.0, 10.0]
    assert history([]) == []
    many = history([(float(t), 1, 0) for t in range(1, 1001)], since=0.0)
    assert len(many) == 61 and many[-1]["rows_done"] == 1000  # at most HISTORY_POINTS steps
