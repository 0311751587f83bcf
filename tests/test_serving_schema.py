"""Property-based API test: schemathesis generates requests from /openapi.json; no 5xx allowed."""

from __future__ import annotations

import pytest
import requests
from serving_helpers import ServiceThread, make_export

from openimages_od.config import load_config
from openimages_od.serving.openapi import openapi_document
from openimages_od.serving.safe_fetch import StaticResolver

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

pytestmark = [pytest.mark.tf, pytest.mark.integration]

# The document the service serves (checked equal below), so the module needs no server at import.
schema = schemathesis.openapi.from_dict(openapi_document("oiod"))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    export = make_export(tmp_path_factory.mktemp("schema") / "export")
    cfg = load_config(None, [f"serve.model={export}", "serve.max_body_mb=2", "serve.fetch_timeout_s=2"])
    # No real DNS: a generated URL can never reach the network.
    with ServiceThread(cfg, resolver=StaticResolver({})) as svc:
        yield svc


def test_served_document_is_the_tested_one(service):
    served = requests.get(service.url("/openapi.json"), timeout=10).json()
    assert served == openapi_document("oiod")


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_5xx(case, service):
    resp = case.call(base_url=service.url("/").rstrip("/"), timeout=30)
    assert resp.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {resp.status_code}: {resp.text[:300]}"
    )
    if resp.status_code >= 400:
        body = resp.json()
        assert set(body["error"]) == {"code", "message"}
