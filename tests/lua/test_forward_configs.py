"""The Fluent Bit configs of the aggregator topology, checked like the others (no Fluent Bit here):
every key is one Fluent Bit 5.1 knows; the node forwarder collects exactly what the DaemonSet
config collects, buffers it on disk and forwards it acknowledged and retried without limit; the
aggregator receives forward traffic and has the same Lua filter, tick and last-resort output as
the DaemonSet config."""

from __future__ import annotations

import pytest

from . import test_configs as node_checks
from .test_configs import (FILTER_COMMON, FILTER_KEYS, INPUT_COMMON, INPUT_KEYS, OUTPUT_COMMON,
                           OUTPUT_KEYS, SERVICE_KEYS, load)

# plugins/out_forward/forward.c config map, plus the network properties every output has.
FORWARD_OUTPUT = {"host", "port", "upstream", "time_as_integer", "shared_key", "self_hostname",
                  "empty_shared_key", "send_options", "require_ack_response", "username",
                  "password", "tag", "compress", "net.keepalive",
                  "net.keepalive_idle_timeout", "net.connect_timeout"}


@pytest.mark.parametrize("name", ["fluent-bit-forwarder.yaml", "fluent-bit-aggregator.yaml"])
def test_sections_and_keys_are_known(name):
    doc = load(name)
    assert set(doc) <= {"service", "includes", "pipeline", "parsers", "env"}
    assert set(doc["service"]) <= SERVICE_KEYS, set(doc["service"]) - SERVICE_KEYS
    for item in doc["pipeline"]["inputs"]:
        known = INPUT_COMMON | INPUT_KEYS[item["name"]]
        assert set(item) <= known, (name, item["name"], set(item) - known)
    for item in doc["pipeline"].get("filters", []):
        known = FILTER_COMMON | FILTER_KEYS[item["name"]]
        assert set(item) <= known, (name, item["name"], set(item) - known)
    outputs = {**OUTPUT_KEYS, "forward": FORWARD_OUTPUT}
    for item in doc["pipeline"]["outputs"]:
        known = OUTPUT_COMMON | outputs[item["name"]]
        assert set(item) <= known, (name, item["name"], set(item) - known)
    svc = doc["service"]
    assert svc["http_server"] is True and svc["http_port"] == 2020 and svc["health_check"] is True


def without_storage(item: dict) -> dict:
    return {k: v for k, v in item.items() if k != "storage.type"}


def test_forwarder_collects_what_the_daemonset_config_collects():
    node, forwarder = load("fluent-bit-kubernetes.yaml"), load("fluent-bit-forwarder.yaml")
    collected = [i for i in node["pipeline"]["inputs"] if i["name"] != "dummy"]
    assert [without_storage(i) for i in forwarder["pipeline"]["inputs"]] == collected
    assert forwarder["pipeline"]["filters"] == [f for f in node["pipeline"]["filters"]
                                                if f["name"] != "lua"]
    assert forwarder.get("includes") == node.get("includes")


def test_forwarder_buffers_on_disk_and_forwards_acknowledged_without_a_retry_limit():
    doc = load("fluent-bit-forwarder.yaml")
    assert doc["service"]["storage.path"].startswith("/var/lib/fluent-bit/")  # the hostPath
    assert all(i["storage.type"] == "filesystem" for i in doc["pipeline"]["inputs"])
    (out,) = doc["pipeline"]["outputs"]
    assert out["name"] == "forward" and out["match"] == "*"
    assert out["require_ack_response"] is True
    assert out["retry_limit"] == "no_limits"  # Fluent Bit's default (1) would drop chunks
    assert out["port"] == 24224


def test_aggregator_maps_forwarded_records_like_the_daemonset():
    doc = load("fluent-bit-aggregator.yaml")
    named = ("fluent-bit-aggregator.yaml", doc)
    # The DaemonSet config's own checks, on this config.
    node_checks.test_lua_filter_points_at_the_entry_and_is_last(named)
    node_checks.test_tick_exists_and_every_input_reaches_the_filter(named)
    node_checks.test_records_the_filter_could_not_spool_are_kept_in_the_spool_volume(named)
    forward = [i for i in doc["pipeline"]["inputs"] if i["name"] == "forward"]
    assert [i["port"] for i in forward] == [24224]
    node_lua = load("fluent-bit-kubernetes.yaml")["pipeline"]["filters"][-1]
    assert doc["pipeline"]["filters"] == [node_lua]
