"""The PutAuditEvents client and the classification of what comes back.

- :func:`make_client` builds one thread-safe boto3 ``cloudtrail-data`` client: retry mode
  ``adaptive`` by default (a client-side token bucket, so many nodes share one channel's 100
  calls/s), a connection pool as large as the requests in flight, credentials from the standard
  chain, or, with ``role_arn``, from ``sts:AssumeRole`` wrapped in botocore's refreshable
  credentials (refreshed shortly before expiry, never one STS call per request). The endpoint comes
  from ``endpoint_url`` or boto3's own ``AWS_ENDPOINT_URL_CLOUDTRAIL_DATA``/``AWS_ENDPOINT_URL``.
- :meth:`Sender.send` sends one batch and returns a :class:`Result` (``successful`` ids,
  ``failed`` ``(id, code, message)``), or raises :class:`RequestFailed` whose ``kind`` says what
  the caller must do:

  ``retry``  throttling, 5xx, network errors, timeouts: send again later, without limit;
  ``pause``  channel or credential problems (``ChannelNotFound``, ``InvalidChannelARN``, access
             denied, expired or missing credentials, any other unexplained 4xx): hold all
             delivery with a capped backoff, delete nothing;
  ``split``  the request as a whole was refused as invalid (``ValidationException``,
             ``DuplicatedAuditEventId``, 413): halve the batch until the culprit event is alone,
             then dead-letter that one event with the code.
- Per-event codes: :data:`RETRYABLE_EVENT_CODES` are sent again (only those events); every other
  code is final for that event.
- Prebuilt request bodies: on the clients :func:`make_client` builds (parameter validation
  off, see :func:`use_prebuilt_bodies`), when every entry passed to :meth:`Sender.send` comes
  from ``events.Prepared.entry()``, botocore is handed ``events.request_body(entries)`` -- the very
  bytes its rest-json serializer would produce, built from each event's bytes serialized once
  in ``events.build`` -- instead of walking and ``json.dumps``-ing the entries again. Two
  handlers on the client do it, correlated through botocore's per-call ``context`` dict:
  ``provide-client-params`` builds the body and leaves ``auditEvents`` out of the parameters
  botocore serializes (the query string, headers and ``Content-Type`` come out as before);
  ``before-call`` puts the body into the request dict before the request is created, so
  ``Content-Length``, SigV4's payload hash and every retry botocore makes use these bytes.
  Entries that are plain dicts are serialized by botocore as usual.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

log = logging.getLogger("cloudtrail_sink.sender")

RETRYABLE_EVENT_CODES = frozenset({"Throttling", "InternalFailure", "ThrottlingException",
                                   "ServiceUnavailable", "InternalServerError"})

THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "TransactionInProgressException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "LimitExceededException", "RequestThrottled", "SlowDown", "PriorRequestNotComplete",
    "EC2ThrottledException", "RequestTimeout", "RequestTimeoutException",
    "InternalFailure", "InternalError", "InternalServerError", "ServiceUnavailable",
    "ServiceUnavailableException",
})
SPLIT_CODES = frozenset({"ValidationException", "SerializationException",
                         "DuplicatedAuditEventId", "RequestEntityTooLargeException",
                         "InvalidParameterException", "InvalidParameterValueException"})


class RequestFailed(Exception):
    def __init__(self, kind: str, code: str, message: str, status: int | None = None):
        super().__init__(f"{code}: {message}")
        self.kind = kind
        self.code = code
        self.message = message
        self.status = status


@dataclasses.dataclass
class Result:
    successful: set[str]
    failed: list[tuple[str, str, str]]


def classify_client_error(code: str, status: int | None) -> str:
    if code in THROTTLING_CODES or (status is not None and (status >= 500 or status == 429)):
        return "retry"
    if code in SPLIT_CODES or status == 413:
        return "split"
    return "pause"


def classify_exception(exc: BaseException) -> RequestFailed:
    import botocore.exceptions as be

    if isinstance(exc, be.ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code") or "Unknown")
        message = str(err.get("Message") or "")
        status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return RequestFailed(classify_client_error(code, status), code, message, status)
    if isinstance(exc, (be.NoCredentialsError, be.PartialCredentialsError,
                        be.CredentialRetrievalError, be.NoRegionError,
                        be.UnauthorizedSSOTokenError, be.TokenRetrievalError,
                        be.InvalidConfigError, be.ProfileNotFound)):
        return RequestFailed("pause", type(exc).__name__, str(exc))
    if isinstance(exc, (be.EndpointConnectionError, be.ConnectionError, be.HTTPClientError,
                        be.ReadTimeoutError, be.ConnectTimeoutError,
                        be.ResponseStreamingError)):
        return RequestFailed("retry", type(exc).__name__, str(exc))
    if isinstance(exc, be.ParamValidationError):
        return RequestFailed("split", "ParamValidationError", str(exc))
    return RequestFailed("retry", type(exc).__name__, str(exc))


def _assume_role_session(base, role_arn: str, region: str | None):
    """A boto3 session whose credentials come from AssumeRole and refresh before expiry."""
    import boto3
    from botocore.credentials import CredentialProvider, DeferredRefreshableCredentials
    from botocore.session import get_session
    import os

    sts = base.client("sts", region_name=region)
    session_name = f"cloudtrail-sink-{os.getpid()}"

    def refresh() -> dict:
        creds = sts.assume_role(RoleArn=role_arn, RoleSessionName=session_name)["Credentials"]
        return {"access_key": creds["AccessKeyId"], "secret_key": creds["SecretAccessKey"],
                "token": creds["SessionToken"], "expiry_time": creds["Expiration"].isoformat()}

    class AssumedRole(CredentialProvider):
        METHOD = "sts-assume-role"

        def load(self):
            # Deferred: the first STS call happens with the first request, so a transient STS
            # problem pauses delivery (and is retried) instead of failing the start.
            return DeferredRefreshableCredentials(refresh_using=refresh, method=self.METHOD)

    botocore_session = get_session()
    # First in the session's public credential chain, so nothing else is asked.
    botocore_session.get_component("credential_provider").insert_before("env", AssumedRole())
    return boto3.Session(botocore_session=botocore_session, region_name=region)


def make_client(region: str | None, endpoint_url: str | None = None, role_arn: str | None = None,
                retry_mode: str = "adaptive", max_attempts: int = 1, max_in_flight: int = 4,
                session: Any = None):
    import boto3
    from botocore.config import Config

    from . import __version__

    base = session or boto3.Session(region_name=region)
    if role_arn:
        base = _assume_role_session(base, role_arn, region)
    config = Config(
        # total_max_attempts counts the first attempt (botocore's max_attempts counts retries).
        retries={"mode": retry_mode, "total_max_attempts": max_attempts},
        max_pool_connections=max(10, 2 * max_in_flight),
        connect_timeout=10, read_timeout=60, tcp_keepalive=True,
        user_agent_extra=f"cloudtrail-sink/{__version__}",
        # The sink checks every entry itself before sending (ids, sizes, schema); botocore's
        # walk over 100 entries per call would only repeat that work.
        parameter_validation=False,
    )
    kwargs: dict[str, Any] = {"region_name": region, "config": config}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    client = base.client("cloudtrail-data", **kwargs)
    use_prebuilt_bodies(client)
    return client


_BODY_KEY = "cloudtrail_sink.request_body"
_EVENT_SUFFIX = "cloudtrail-data.PutAuditEvents"


def _lift_body(params, context, **_):
    """provide-client-params: build the body; botocore serializes the rest of the parameters."""
    from . import events

    entries = params.get("auditEvents")
    body = events.request_body(entries) if isinstance(entries, list) else None
    if body is None:
        return None
    context[_BODY_KEY] = body
    return {k: v for k, v in params.items() if k != "auditEvents"}


def _place_body(params, context, **_):
    """before-call: the request dict's body becomes the prebuilt one, before signing."""
    body = context.pop(_BODY_KEY, None)
    if body is not None:
        params["body"] = body


def use_prebuilt_bodies(client) -> bool:
    """Register the prebuilt-body handlers on ``client`` (once); False, registering nothing,
    when its parameter validation is on (botocore would refuse parameters without
    ``auditEvents``). ``client.meta.config`` does not tell (it always says True), the
    serializer does: validation wraps it."""
    from .botocompat import validates_parameters

    if validates_parameters(client):
        return False
    client.meta.events.register(f"provide-client-params.{_EVENT_SUFFIX}", _lift_body,
                                unique_id="cloudtrail-sink-lift-body")
    client.meta.events.register(f"before-call.{_EVENT_SUFFIX}", _place_body,
                                unique_id="cloudtrail-sink-place-body")
    return True


class Sender:
    def __init__(self, client, channel_arn: str, external_id: str | None = None):
        self.client = client
        self.channel_arn = channel_arn
        self.external_id = external_id

    def send(self, entries: list[dict]) -> Result:
        kwargs: dict[str, Any] = {"auditEvents": entries, "channelArn": self.channel_arn}
        if self.external_id:
            kwargs["externalId"] = self.external_id
        try:
            resp = self.client.put_audit_events(**kwargs)
        except Exception as exc:  # classified, never swallowed: the caller acts on the kind
            raise classify_exception(exc) from exc
        successful = {e.get("id") for e in resp.get("successful") or ()}
        failed = [(f.get("id"), str(f.get("errorCode") or "Unknown"), str(f.get("errorMessage") or ""))
                  for f in resp.get("failed") or ()]
        return Result(successful, failed)
