"""Sub-commands of ``cloudtrail-sink``.

Each module here exposes ``register(subparsers)``, which adds its parser(s) and sets
``func`` (called with the parsed namespace, returning the exit code) as the parser default.
"""
