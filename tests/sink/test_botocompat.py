"""The sink's only use of a botocore internal (botocompat.py) fails loudly when botocore
changes, instead of silently sending what botocore would not."""

from __future__ import annotations

import boto3
import botocore.config
import pytest

from cloudtrail_sink import botocompat
from cloudtrail_sink.sender import use_prebuilt_bodies


def _client(validation: bool):
    return boto3.Session(aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="x",
                         region_name="us-east-1").client(
        "cloudtrail-data", config=botocore.config.Config(parameter_validation=validation))


def test_the_installed_botocore_is_understood():
    assert botocompat.validates_parameters(_client(True)) is True
    assert botocompat.validates_parameters(_client(False)) is False


def test_prebuilt_bodies_only_where_botocore_would_not_validate_them():
    # With validation on, botocore would refuse parameters without auditEvents: no handlers.
    assert use_prebuilt_bodies(_client(True)) is False
    assert use_prebuilt_bodies(_client(False)) is True


def test_a_botocore_without_the_serializer_attribute_is_refused(monkeypatch):
    client = _client(False)
    monkeypatch.delattr(client, "_serializer")
    with pytest.raises(botocompat.IncompatibleBotocore, match="botocore"):
        botocompat.validates_parameters(client)
