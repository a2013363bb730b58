"""cloudtrail-sink: at-least-once delivery of spooled audit events into AWS CloudTrail Lake."""

__version__ = "0.1.0"
