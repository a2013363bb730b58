"""Delivery of spooled events: segment reading, the ack journal (see docs/architecture.md)."""
