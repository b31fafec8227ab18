"""The policy `pointflow intake policy` prints keeps a customer's credentials to its drop zone,
checked on a moto server that enforces IAM (its own process: the enforcement is read at start)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pipelines.intake import customer_policy
from pointflow_dev.stack_plan import free_port
from tests.conftest import stop_processes

# The requests moto serves before it enforces IAM: the set-up below, made with the admin's keys.
SETUP_REQUESTS = 6


@pytest.fixture
def enforcing_s3() -> Iterator[str]:
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_REQUESTS))
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                stop_processes([server], 5)
                pytest.fail("moto server did not start")
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    stop_processes([server], 5)


def test_a_customer_can_use_its_own_drop_zone_and_nothing_else(enforcing_s3: str) -> None:
    import boto3
    from botocore.exceptions import ClientError

    admin = dict(
        endpoint_url=enforcing_s3, region_name="us-east-1", aws_access_key_id="admin", aws_secret_access_key="admin"
    )
    s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
    s3.create_bucket(Bucket="pointflow-data")
    s3.put_object(Bucket="pointflow-data", Key="prod/incoming/beta/theirs.laz", Body=b"beta's")
    s3.put_object(Bucket="pointflow-data", Key="prod/accounts/acme/raw/stored.laz", Body=b"stored")
    iam.create_user(UserName="acme")
    policy = customer_policy("s3://pointflow-data/prod", "acme")
    iam.put_user_policy(UserName="acme", PolicyName="pointflow-drop-zone", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="acme")["AccessKey"]  # the last unchecked request
    acme = boto3.client(
        "s3",
        endpoint_url=enforcing_s3,
        region_name="us-east-1",
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
    )

    def allowed(call, **kwargs) -> bool:
        try:
            call(Bucket="pointflow-data", **kwargs)
            return True
        except ClientError as error:
            assert error.response["Error"]["Code"] == "AccessDenied"
            return False

    assert allowed(acme.put_object, Key="prod/incoming/acme/survey.laz", Body=b"points")
    assert allowed(acme.get_object, Key="prod/incoming/acme/survey.laz")
    assert allowed(acme.list_objects_v2, Prefix="prod/incoming/acme/")
    assert allowed(acme.delete_object, Key="prod/incoming/acme/survey.laz")
    assert not allowed(
        acme.put_object, Key="prod/incoming/beta/survey.laz", Body=b"points"
    )  # another customer's drop zone
    assert not allowed(acme.get_object, Key="prod/incoming/beta/theirs.laz")
    assert not allowed(acme.delete_object, Key="prod/incoming/beta/theirs.laz")
    assert not allowed(
        acme.put_object, Key="prod/accounts/acme/raw/forged.laz", Body=b"points"
    )  # the service's own areas
    assert not allowed(acme.get_object, Key="prod/accounts/acme/raw/stored.laz")
    assert not allowed(
        acme.put_object, Key="prod/incoming/acme-evil/survey.laz", Body=b"points"
    )  # a longer id is not a sub-folder
    # moto does not evaluate the s3:prefix condition on listing (MinIO and AWS do): not asserted here.


def test_the_policy_needs_an_s3_store() -> None:
    with pytest.raises(ValueError, match="not S3"):
        customer_policy("file:///srv/objects", "acme")
    assert customer_policy("s3://bucket", "acme")["Statement"][0]["Resource"] == ["arn:aws:s3:::bucket/incoming/acme/*"]
