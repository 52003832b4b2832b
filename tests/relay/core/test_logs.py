"""Structured logs: JSON lines that name the job they are about."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from relay.core.logs import JsonFormatter, TextFormatter, configure, job_context
from tests.helpers import chat_body, create_job, read_stream


def test_lines_logged_inside_a_job_context_carry_its_id():
    record = logging.LogRecord(
        "relay.x", logging.WARNING, __file__, 1, "upstream %s", ("down",), None
    )
    formatter = JsonFormatter()
    assert "job_id" not in json.loads(formatter.format(record))
    with job_context("job_abc"):
        line = json.loads(formatter.format(record))
    assert line["job_id"] == "job_abc" and line["msg"] == "upstream down"
    assert line["level"] == "WARNING" and line["logger"] == "relay.x"


def test_a_client_string_cannot_forge_a_text_log_line():
    forged = "gpt\n2026-01-01 00:00:00 INFO relay.web.auth: admin key accepted"
    record = logging.LogRecord(
        "relay.x", logging.INFO, __file__, 1, "job queued (model %s)", (forged,), None
    )
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert "\n" not in line and "admin key accepted" in line
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    assert "Traceback" in TextFormatter().format(record)  # tracebacks keep their lines


def test_a_line_is_logged_without_a_walk_up_the_stack(monkeypatch, capsys):
    """A job's log line is on its first token's path: what no line shows is not looked up."""
    for name in ("_srcfile", "logThreads", "logMultiprocessing"):
        monkeypatch.setattr(logging, name, getattr(logging, name))  # put back after the test
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)

    def walk(*args, **kwargs):
        raise AssertionError("the caller's frame was looked up")

    monkeypatch.setattr(logging.Logger, "findCaller", walk)
    configure("INFO")
    monkeypatch.setattr(root.handlers[0], "stream", sys.stderr)  # capsys's, not the real one
    with job_context("job_abc"):
        logging.getLogger("relay.x").info("job %s queued", "job_abc")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["msg"] == "job job_abc queued" and line["job_id"] == "job_abc"
    assert line["pid"] > 0 and line["level"] == "INFO"


def json_lines(output: str) -> list[dict]:
    """A process's JSON log lines (gunicorn's and Python's own lines are not JSON)."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_every_worker_line_about_a_job_names_it(stack):
    base = stack.start_web()
    worker = stack.start_worker()
    jobs = [
        create_job(base, chat_body("ok", tokens=3)),
        create_job(base, chat_body("x", fail="status_500")),
    ]
    for job in jobs:
        read_stream(job["events_url"])
    lines = json_lines(worker.output())
    assert lines, worker.output()
    for job, least in zip(jobs, (2, 1), strict=True):  # streaming + completed; failed
        about = [line for line in lines if job["id"] in line["msg"]]
        assert len(about) >= least, f"too few log lines for {job['id']}: {about}"
        assert all(line.get("job_id") == job["id"] for line in about), about


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_an_upstream_silent_before_its_first_chunk_is_logged_and_a_streaming_one_is_not(stack):
    """A job's first worker line otherwise comes with its first chunk: an upstream that sends
    nothing for a while gets a line of its own, naming the job, before that; one that streams
    at once never does, however long its stream lasts."""
    base = stack.start_web()
    worker = stack.start_worker(env={"RELAY_UPSTREAM_SILENCE_LOG_SECONDS": "0.5"})
    slow = create_job(base, chat_body("slow", tokens=2, first_delay=2.0))
    steady = create_job(base, chat_body("steady", tokens=8, interval=0.2))  # 1.6 s in all
    for job in (slow, steady):
        assert read_stream(job["events_url"])[0].done
    lines = json_lines(worker.output())
    silent = [line for line in lines if "no chunk yet" in line["msg"]]
    assert [line.get("job_id") for line in silent] == [slow["id"]], silent
    assert "no chunk yet from upstream default, 0.5 s after the request" in silent[0]["msg"]
    about_slow = [line["msg"] for line in lines if slow["id"] in line["msg"]]
    streaming = next(n for n, msg in enumerate(about_slow) if "streaming from upstream" in msg)
    assert about_slow.index(silent[0]["msg"]) < streaming, about_slow
