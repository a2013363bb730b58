"""The one place the sink reads a botocore internal, checked so an incompatible botocore fails
loudly instead of silently changing what is sent.

:func:`validates_parameters` says whether a client validates its parameters before serializing
them. botocore has no public way to ask: ``client.meta.config.parameter_validation`` reads True
whatever the client was built with. The answer is in the client's serializer, which validation
wraps (``botocore.validate.ParamValidationDecorator``); botocore keeps it in the private
``client._serializer``. If that attribute is missing or is neither the decorator nor a
serializer, :class:`IncompatibleBotocore` is raised (``make_client`` then fails at start-up,
and ``tests/sink/test_botocompat.py`` fails) rather than guessing.
"""

from __future__ import annotations

from typing import Any


class IncompatibleBotocore(RuntimeError):
    pass


def validates_parameters(client: Any) -> bool:
    from botocore.validate import ParamValidationDecorator

    serializer = getattr(client, "_serializer", None)
    if isinstance(serializer, ParamValidationDecorator):
        return True
    if serializer is None or not callable(getattr(serializer, "serialize_to_request", None)):
        import botocore

        raise IncompatibleBotocore(
            f"botocore {botocore.__version__}: a client's serializer is no longer where "
            "cloudtrail-sink looks for it (client._serializer); pin a botocore version the "
            "sink supports (see sink/pyproject.toml)")
    return False
