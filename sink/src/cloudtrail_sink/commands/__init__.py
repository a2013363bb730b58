"""Sub-commands of ``cloudtrail-sink``.

Each module here exposes ``register(subparsers)``, which adds its parser(s) and sets
``func`` (called with the parsed namespace, returning the exit code) as the parser default.
"""

from typing import Any, Protocol


class SubParsers(Protocol):
    """What ``register`` needs of ``ArgumentParser.add_subparsers()``'s result (argparse has
    no public name for its type)."""

    def add_parser(self, name: str, **kwargs: Any) -> Any: ...
