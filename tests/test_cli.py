"""The `labloop` CLI against the running stack: publish with bad rows, sql through the chDB bridge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def test_publish_compounds_reports_malformed_rows_and_publishes_the_rest(cli: Any, ch: Any, tmp_path: Path) -> None:
    f = tmp_path / "lims.csv"
    f.write_text("id,structure\nA1,CCO\nA2,\n,CCN\nA4,c1ccccc1\n")
    out = cli("publish", "compounds", str(f), "--campaign", "cli-c", "--smiles-col", "structure",
                  "--id-col", "id")
    assert out.returncode == 0, out.stderr
    assert "row 3: empty 'structure'" in out.stderr and "row 4: empty 'id'" in out.stderr
    assert "published 2 compounds; 2 malformed row(s) skipped" in out.stdout
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = ch.query("SELECT compound_id FROM compounds WHERE campaign_id='cli-c' ORDER BY compound_id").result_rows
        if len(rows) >= 2:
            break
        time.sleep(0.3)
    assert rows == [("A1",), ("A4",)]


def test_publish_readings_with_qualifiers_and_missing_column(cli: Any, ch: Any, tmp_path: Path) -> None:
    f = tmp_path / "plate.csv"
    f.write_text("compound_id,ic50\nA1,<0.5\nA4,12.5\nA5,n/a\n")
    out = cli("publish", "readings", str(f), "--campaign", "cli-c", "--assay", "ic50", "--unit", "uM",
                  "--value-col", "ic50")
    assert out.returncode == 0, out.stderr
    assert "row 4: value 'n/a' is not a number" in out.stderr
    again = cli("publish", "readings", str(f), "--campaign", "cli-c", "--assay", "ic50", "--unit", "uM",
                    "--value-col", "ic50")
    assert again.returncode == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = ch.query("SELECT compound_id, qualifier, value FROM readings WHERE campaign_id='cli-c' "
                        "ORDER BY compound_id, event_time").result_rows
        if len(rows) >= 2:
            break
        time.sleep(0.3)
    time.sleep(2.0)  # the sink flushes every 0.5 s: a second copy of either reading would be stored by now
    rows = ch.query("SELECT compound_id, qualifier, value FROM readings WHERE campaign_id='cli-c' "
                    "ORDER BY compound_id").result_rows
    # re-publishing the same file reuses the reading ids: stored once, and the model would not count them twice
    assert rows == [("A1", "<", 0.5), ("A4", "=", 12.5)]

    bad = cli("publish", "readings", str(f), "--campaign", "cli-c", "--assay", "a", "--unit", "u")
    assert bad.returncode != 0
    assert "missing column(s) ['value']" in bad.stderr


def test_sql_formats_through_the_http_bridge(cli: Any) -> None:
    out = cli("sql", "SELECT number AS n, toString(number * 2) AS s FROM system.numbers LIMIT 3",
                  "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"n": 0, "s": "0"}, {"n": 1, "s": "2"}, {"n": 2, "s": "4"}]
    csv_out = cli("sql", "SELECT 1 AS a, 'x' AS b", "--format", "csv")
    assert csv_out.stdout.splitlines() == ["a,b", "1,x"]
    table = cli("sql", "SHOW TABLES")
    for name in ("readings", "requests", "predictions", "dead_letters"):
        assert name in table.stdout
    err = cli("sql", "SELECT no_such_column FROM readings")
    assert err.returncode == 2 and "UNKNOWN_IDENTIFIER" in err.stderr


def test_the_cli_the_sink_and_the_dashboard_start_without_torch_or_rdkit() -> None:
    """Importing both took 2.3 s of every ``labloop`` command (and of each child's start); only
    the worker, recovery and the benches need them."""
    import labloop.models as models

    code = ("import sys, labloop.streams.cli, labloop.consumers.sink, labloop.consumers.dashboard\n"
            "from labloop.streams.definition import CampaignSpec\n"
            "print(sorted(m for m in ('torch', 'rdkit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert sorted(models.__all__) == sorted(models._WHERE)
    assert all(getattr(models, n) is not None for n in models.__all__)  # every lazy name resolves


def test_commands_without_a_broker_say_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABLOOP_")}
    f = tmp_path / "x.csv"
    f.write_text("smiles\nC\n")
    out = subprocess.run([sys.executable, "-m", "labloop.streams.cli", "publish", "compounds", str(f), "--campaign", "c"],
                         env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode != 0
    assert "LABLOOP_KAFKA_BOOTSTRAP" in out.stderr


def test_a_busy_http_port_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    from labloop.streams.runtime import RuntimeFailure, Stack
    from labloop.streams.settings import Settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        try:
            Stack(Settings(data_dir=tmp_path, clickhouse_http_port=port)).__enter__()
            raise AssertionError("the stack started on a busy port")
        except RuntimeFailure as exc:
            assert f"127.0.0.1:{port} is already in use" in str(exc)


def _labloop(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "labloop.streams.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "250", **env})


def test_a_user_mistake_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    bad = _labloop("campaign", "c1", "--assay", "a", "--unit", "u", "--ttl-s", "nan")
    assert bad.returncode == 2
    assert "request_ttl_s = nan: must be a finite number of seconds" in bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout and len(bad.stderr.strip().splitlines()) == 1
    setting = _labloop("topics", LABLOOP_DEVICE="tpu", LABLOOP_DATA_DIR=str(tmp_path))
    assert setting.returncode == 2 and "setting LABLOOP_DEVICE" in setting.stderr
    assert "Traceback" not in setting.stderr


def test_the_wheel_installs_one_namespace_only(tmp_path: Path) -> None:
    """`pip install .` puts only `labloop` (and its metadata) into site-packages: no top-level
    `models`, `schemas`, `streams` or `consumers` to collide with other projects."""
    import shutil
    import zipfile

    root = Path(__file__).resolve().parent.parent
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for pkg in ("schemas", "models", "streams", "consumers"):
        shutil.copytree(root / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("labloop-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"labloop", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"labloop/streams/cli.py", "labloop/models/learners.py", "labloop/schemas/avro/Campaign.avsc",
            "labloop/schemas/avro/history/Campaign.v2.avsc", "labloop/consumers/robot.py"} <= names
    assert "labloop = labloop.streams.cli:main" in zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()


def test_requeue_puts_a_pending_request_back_under_a_new_id(cli: Any, stack: Any, ch: Any, codec: Any) -> None:
    from itertools import islice

    from labloop.consumers import LabConfig, Oracle, RobotClient, VirtualLab
    from labloop.consumers.kafka import make_consumer, make_producer
    from labloop.consumers.publisher import compound_rows, publish_records
    from labloop.schemas import TOPICS
    from labloop.streams.campaign import now_ms
    from labloop.streams.definition import CampaignSpec

    data = Path(__file__).parent / "data" / "tpsa_300.csv"
    cid = "requeue-it"
    pool = list(islice((r for r in compound_rows(data, cid) if not isinstance(r, Exception)), 20))
    producer = make_producer(stack.kafka_config)
    spec = CampaignSpec(cid, "tpsa", "A^2", batch_size=3, init_size=3, budget=4, min_pool_size=20,
                        schedule="CONTINUOUS", request_ttl_s=3600.0)
    publish_records(producer, codec, "campaigns", "Campaign", iter([spec.to_record(now_ms())]))
    publish_records(producer, codec, "compounds", "CompoundRegistered", iter(pool))
    producer.close()

    def ids() -> list[str]:
        return [r[0] for r in ch.query(f"SELECT request_id FROM requests WHERE campaign_id = '{cid}' "
                                       f"ORDER BY sequence").result_rows]

    deadline = time.monotonic() + 60
    while len(ids()) < 3 and time.monotonic() < deadline:
        time.sleep(0.3)
    first = ids()
    assert len(first) == 3
    out = cli("requeue", first[0], "--reason", "plate dropped")
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 60
    while len(ids()) < 4 and time.monotonic() < deadline:
        time.sleep(0.3)
    again = ids()
    assert len(again) == 4 and again[:3] == first and again[3] not in first  # a new id; none reused
    st = ch.query(f"SELECT status, robot_id, reason FROM request_status WHERE request_id = '{first[0]}'").result_rows
    assert st == [("EXPIRED", "labloop-requeue", "plate dropped")]
    twice = cli("requeue", first[0])
    assert twice.returncode == 2 and "EXPIRED already" in twice.stderr
    unknown = cli("requeue", "no-such-request")
    assert unknown.returncode == 2 and "no request 'no-such-request'" in unknown.stderr
    # A robot reported one COMPLETED, but no reading of it was accepted: still pending, it may go back.
    producer = make_producer(stack.kafka_config)
    publish_records(producer, codec, "status", "RequestStatus", iter([{
        "request_id": again[1], "campaign_id": cid, "compound_id": "?", "status": "COMPLETED", "robot_id": "lost-plate",
        "reason": None, "event_time": now_ms()}]))
    producer.close()
    deadline = time.monotonic() + 60
    while not ch.query(f"SELECT count() FROM request_status WHERE request_id = '{again[1]}'").result_rows[0][0] \
            and time.monotonic() < deadline:
        time.sleep(0.3)
    lost = cli("requeue", again[1], "--reason", "result lost")
    assert lost.returncode == 0, lost.stderr
    deadline = time.monotonic() + 60
    while len(ids()) < 5 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert len(ids()) == 5  # its place in the budget came back: a fifth request
    # Answer what is pending, so that no later test's robot finds this campaign's requests.
    lab = VirtualLab(RobotClient(stack.kafka_config, codec, robot_id="requeue-robot"),
                     Oracle.from_csv(data, "smiles", "tpsa"), LabConfig(unit="A^2")).start()
    mon = make_consumer(stack.kafka_config, "requeue-monitor")
    mon.subscribe([TOPICS["model_updates"].name])
    try:
        deadline, done = time.monotonic() + 90, False
        while not done and time.monotonic() < deadline:
            for m in mon.consume(100, 0.5):
                if not m.error():
                    r = codec.decode(m.value()).record
                    done = done or (r["campaign_id"] == cid and r["done"])
    finally:
        mon.close()
        lab.stop()
    assert done  # the budget of 4 spent: three first requests, two of them put back, and their replacements
    sql = (f"SELECT request_id FROM request_status WHERE campaign_id = '{cid}' AND robot_id = 'requeue-robot' "
           f"AND status = 'COMPLETED' AND request_id IN (SELECT request_id FROM accepted_readings) LIMIT 1")
    deadline = time.monotonic() + 60
    while not ch.query(sql).result_rows and time.monotonic() < deadline:
        time.sleep(0.3)
    measured = ch.query(sql).result_rows[0][0]
    answered = cli("requeue", measured)
    assert answered.returncode == 2 and "COMPLETED already" in answered.stderr
