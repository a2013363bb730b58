"""``cloudtrail-sink run`` as a process: SIGKILL at random moments loses nothing and deletes
nothing early; SIGTERM exits 0; one sink per spool; inotify wakes it (idle CPU near zero);
polling mode; options from flags and environment variables."""

from __future__ import annotations

import collections
import os
import random
import subprocess
import sys
import time

import psutil
import pytest

from cloudtrail_sink.emulator import Faults

from sinksupport import (CHANNEL_ARN, SinkProcess, event, failed_lines, fill, run_sink,
                         stored_uids, uids_in_segment, wait_for)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_and_deletes_nothing_early(tmp_path, emulator):
    emulator.set_faults(Faults(latency_ms=60, event_throttling_rate=0.01))
    spool_dir = tmp_path / "spool"
    total = 6000
    fill(spool_dir, [event(i, pad=200) for i in range(total)], max_events=100)
    fill(spool_dir, [event("bad", eventTime="never")])  # one dead letter among them
    rnd = random.Random(42)
    ready = spool_dir / "ready"
    mid_delivery_kills = 0
    for round_ in range(5):
        before = {name: uids_in_segment(ready / name) for name in os.listdir(ready)}
        accepted = emulator.stats()["accepted"]
        with SinkProcess(spool_dir, emulator.url, "--linger-ms", "50") as sink:
            # Kill while delivering: after this run's first acknowledgement, at a random moment.
            wait_for(lambda: emulator.stats()["accepted"] > accepted, timeout=30)
            time.sleep(rnd.uniform(0.1, 0.5))
            sink.proc.kill()
            sink.proc.wait(10)
        settled = set(stored_uids(emulator)) | {line["eventData"]["UID"]
                                                for line in failed_lines(spool_dir)}
        left = set(os.listdir(ready))
        for name in set(before) - left:  # a deleted segment had every event settled
            missing = set(before[name]) - settled
            assert not missing, f"round {round_}: {name} deleted with {len(missing)} unsettled"
        mid_delivery_kills += bool(left)
        print(f"round {round_}: {len(before) - len(left)} of {len(before)} segments settled")
        if not left:
            break
    assert mid_delivery_kills >= 2  # the kills did land while segments were still pending
    result = run_sink(spool_dir, emulator.url, "--drain", timeout=120)
    assert result.returncode == 0, result.stderr
    stored = collections.Counter(stored_uids(emulator))
    assert set(stored) == {f"evt-{i}" for i in range(total)}  # duplicates allowed, loss not
    assert [line["id"] for line in failed_lines(spool_dir)] == ["evt-bad"]
    assert os.listdir(ready) == []


def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path, emulator):
    emulator.set_faults(Faults(latency_ms=300))
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(i) for i in range(2000)], max_events=100)
    with SinkProcess(spool_dir, emulator.url, "--log-format", "json") as sink:
        wait_for(lambda: emulator.stats()["requests"].get("ok", 0) >= 1, timeout=30)
        rc, _, err = sink.terminate()
    assert rc == 0, err
    assert '"message": "sink stopped"' in err
    # Whatever was acknowledged was settled; what was not stays in ready/ for the next run.
    left = sum(len(uids_in_segment(spool_dir / "ready" / n))
               for n in os.listdir(spool_dir / "ready"))
    assert left >= 2000 - len(stored_uids(emulator))
    assert run_sink(spool_dir, emulator.url, "--drain").returncode == 0
    assert set(stored_uids(emulator)) == {f"evt-{i}" for i in range(2000)}


def test_a_second_sink_on_the_same_spool_is_refused(tmp_path, emulator):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [])
    with SinkProcess(spool_dir, emulator.url) as first:
        wait_for(lambda: (spool_dir / "sink.lock").exists()
                 and (spool_dir / "sink.lock").read_text().strip() == str(first.proc.pid))
        second = run_sink(spool_dir, emulator.url, "--drain")
        assert second.returncode == 3
        assert str(spool_dir) in second.stderr and f"pid {first.proc.pid}" in second.stderr


def test_idle_sink_uses_no_cpu_and_inotify_wakes_it(tmp_path, emulator):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [])
    with SinkProcess(spool_dir, emulator.url, "--rescan-seconds", "600") as sink:
        proc = psutil.Process(sink.proc.pid)
        wait_for(lambda: len(proc.threads()) >= 6, timeout=30)  # started
        time.sleep(0.5)
        cpu0 = sum(proc.cpu_times()[:2])
        time.sleep(2.0)
        idle_cpu = sum(proc.cpu_times()[:2]) - cpu0
        assert idle_cpu < 0.05, f"idle sink used {idle_cpu:.3f}s CPU in 2 s"
        fill(spool_dir, [event("late")])  # no rescan for 600 s: only inotify can see it
        wait_for(lambda: stored_uids(emulator) == ["evt-late"], timeout=10)
        wait_for(lambda: os.listdir(spool_dir / "ready") == [], timeout=10)


def test_polling_mode_finds_new_segments(tmp_path, emulator):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [])
    with SinkProcess(spool_dir, emulator.url, "--poll", "--poll-seconds", "0.2"):
        time.sleep(1.0)
        fill(spool_dir, [event("polled")])
        wait_for(lambda: stored_uids(emulator) == ["evt-polled"], timeout=15)


def test_options_from_environment_variables(tmp_path, emulator):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(1)])
    env = dict(os.environ, CLOUDTRAIL_SPOOL_DIR=str(spool_dir),
               AWS_CLOUDTRAIL_DATA_CHANNELARN=CHANNEL_ARN,  # the Go plugin's name
               AWS_ENDPOINT_URL_CLOUDTRAIL_DATA=emulator.url,  # read by boto3 itself
               CLOUDTRAIL_SINK_LISTEN="127.0.0.1:0", CLOUDTRAIL_SINK_DRAIN="true")
    env.pop("AWS_DEFAULT_REGION")  # the region comes from the channel ARN
    result = subprocess.run([sys.executable, "-m", "cloudtrail_sink", "run"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert stored_uids(emulator) == ["evt-1"]


@pytest.mark.parametrize("args,message", [
    (["--channel-arn", "arn:aws:s3:::bucket"], "is not a CloudTrail channel ARN"),
    (["--channel-arn", CHANNEL_ARN, "--max-batch-events", "101"], "--max-batch-events"),
    (["--channel-arn", CHANNEL_ARN, "--max-request-bytes", "2000000"], "--max-request-bytes"),
    ([], "--channel-arn"),
])
def test_bad_options_exit_2_naming_the_option(tmp_path, aws_env, args, message):
    result = subprocess.run([sys.executable, "-m", "cloudtrail_sink", "run", "--spool-dir",
                             str(tmp_path), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr


def test_spool_write_reads_json_lines_and_reports_bad_lines(tmp_path, emulator):
    src = tmp_path / "events.jsonl"
    src.write_text('{"UID": "a", "eventName": "n"}\n'
                   '{"eventData": {"UID": "b"}, "tag": "app", "time": 5.5, "id": "id-b"}\n'
                   "not json\n"
                   '{"eventData": {"UID": "c"}, "time": "soon"}\n'
                   "\n[1]\n")
    spool_dir = tmp_path / "spool"
    result = subprocess.run([sys.executable, "-m", "cloudtrail_sink", "spool", "write",
                             "--spool-dir", str(spool_dir), str(src)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    for lineno in (3, 4, 6):
        assert f"{src}:{lineno}:" in result.stderr
    [seg] = os.listdir(spool_dir / "ready")
    from cloudtrail_sink import spool
    from cloudtrail_sink.delivery.reader import read_segment

    with spool.open_segment(str(spool_dir / "ready" / seg)) as f:
        records = [r.value for r in read_segment(f)]
    assert records[0]["eventData"] == {"UID": "a", "eventName": "n"} and records[0]["tag"] == "cli"
    assert records[1] == {"eventData": {"UID": "b"}, "tag": "app", "time": 5.5, "id": "id-b"}
    assert len(records) == 2
    stats = subprocess.run([sys.executable, "-m", "cloudtrail_sink", "spool", "stats",
                            "--spool-dir", str(spool_dir), "--json"],
                           capture_output=True, text=True, timeout=60)
    assert '"ready": {"files": 1' in stats.stdout


def test_logs_carry_no_payloads_at_the_default_level(tmp_path, emulator):
    emulator.set_faults(Faults(event_throttling_rate=0.2, throttle_rate=0.2))
    spool_dir = tmp_path / "spool"
    marker = "PAYLOAD-MARKER-7f3a"
    fill(spool_dir, [event(i, additionalEventData={"secret": marker}) for i in range(300)]
         + [event("bad", eventTime="never", additionalEventData={"secret": marker})])
    (spool_dir / "ready" / "notes.txt").write_text(marker)
    result = run_sink(spool_dir, emulator.url, "--drain", "--max-backoff-seconds", "0.2")
    assert result.returncode == 0, result.stderr
    assert "events refused by the pre-send check" in result.stderr  # it did log the failure
    assert marker not in result.stderr and marker not in result.stdout
    assert len(set(stored_uids(emulator))) == 300
