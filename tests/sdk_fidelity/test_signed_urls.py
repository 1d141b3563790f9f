"""Signed file URLs exactly as novita-sandbox 2.1.1 makes them
(`download_url` / `upload_url` of a secured sandbox, the SDK's default),
fetched by a plain HTTP client that sends nothing else, in the two
addressing forms stasis serves:
- `NOVITA_SANDBOX_URL` (the URL names no sandbox: the server finds the
  sandbox whose envd token made the signature);
- `{port}-{id}.{domain}` in the Host header (what the SDK builds without
  NOVITA_SANDBOX_URL; TLS aside, the same request)."""

import urllib.parse

import httpx
import pytest

from novita_sandbox.core import Sandbox
from novita_sandbox.core.connection_config import ConnectionConfig


def host_form(url, sandbox, server_url):
    """The SDK's URL with its Host routing form: the URL the SDK makes for
    domain `stasis.test` without NOVITA_SANDBOX_URL, sent to the server."""
    cfg = ConnectionConfig(domain="stasis.test", api_key="unused", sandbox_url=None)
    cfg._sandbox_url = None
    domain_url = cfg.get_sandbox_url(sandbox.sandbox_id, "stasis.test")
    host = urllib.parse.urlsplit(domain_url).netloc
    assert host == f"49983-{sandbox.sandbox_id}.stasis.test"
    parts = urllib.parse.urlsplit(url)
    server = urllib.parse.urlsplit(server_url)
    return urllib.parse.urlunsplit(("http", server.netloc, parts.path, parts.query, "")), {"Host": host}


def tamper(url):
    parts = urllib.parse.urlsplit(url)
    q = urllib.parse.parse_qs(parts.query)
    sig = q["signature"][0]
    q["signature"] = [sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q, doseq=True)))


def drop_signature(url):
    parts = urllib.parse.urlsplit(url)
    q = urllib.parse.parse_qs(parts.query)
    q.pop("signature", None)
    q.pop("signature_expiration", None)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q, doseq=True)))


def assert_401(r, message):
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.json() == {"code": 401, "message": message}, r.text


@pytest.mark.parametrize("form", ["sandbox_url", "host"])
def test_signed_download_and_upload_urls(sandbox, server_url, form):
    assert sandbox._envd_access_token, "the SDK's default sandbox is secured"
    sandbox.files.write("signed/hello.txt", "hello signed")
    url = sandbox.download_url("signed/hello.txt")
    assert "signature=v1_" in url and "Novita" not in url
    extra = {}
    if form == "host":
        url, extra = host_form(url, sandbox, server_url)
    r = httpx.get(url, headers=extra)
    assert r.status_code == 200, r.text
    assert r.text == "hello signed"

    up = sandbox.upload_url("signed/up.txt")
    if form == "host":
        up, _ = host_form(up, sandbox, server_url)
    r = httpx.post(up, files={"file": ("ignored-name", b"uploaded via signed url")}, headers=extra)
    assert r.status_code == 200, r.text
    assert sandbox.files.read("signed/up.txt") == "uploaded via signed url"

    # With an expiration still ahead, for another user name as signed.
    url = sandbox.download_url("signed/hello.txt", use_signature_expiration=120)
    assert "signature_expiration=" in url
    if form == "host":
        url, _ = host_form(url, sandbox, server_url)
    r = httpx.get(url, headers=extra)
    assert r.status_code == 200 and r.text == "hello signed", r.text

    # A read signature doesn't upload, and a write one doesn't download.
    url = sandbox.download_url("signed/up.txt")
    if form == "host":
        url, _ = host_form(url, sandbox, server_url)
    assert_401(httpx.post(url, files={"file": ("x", b"evil")}, headers=extra), "invalid signature")
    assert sandbox.files.read("signed/up.txt") == "uploaded via signed url"


@pytest.mark.parametrize("form", ["sandbox_url", "host"])
def test_expired_tampered_and_missing_signatures(sandbox, server_url, form):
    sandbox.files.write("signed/secret.txt", "secret")
    expired = sandbox.download_url("signed/secret.txt", use_signature_expiration=-5)
    tampered = tamper(sandbox.download_url("signed/secret.txt"))
    other_path = sandbox.download_url("signed/other.txt")
    other_path = other_path.replace("other.txt", "secret.txt")
    missing = drop_signature(sandbox.download_url("signed/secret.txt"))
    extra = {}
    if form == "host":
        extra = host_form(expired, sandbox, server_url)[1]
        expired, tampered, other_path, missing = (
            host_form(u, sandbox, server_url)[0] for u in (expired, tampered, other_path, missing)
        )
    assert_401(httpx.get(expired, headers=extra), "signature is already expired")
    assert_401(httpx.get(tampered, headers=extra), "invalid signature")
    assert_401(httpx.get(other_path, headers=extra), "invalid signature")
    if form == "host":
        assert_401(httpx.get(missing, headers=extra), "missing signature query parameter")
    else:
        # No signature, no routing header: nothing names a sandbox.
        r = httpx.get(missing)
        assert r.status_code in (401, 404), r.text
    up = tamper(sandbox.upload_url("signed/evil.txt"))
    if form == "host":
        up = host_form(up, sandbox, server_url)[0]
    assert_401(httpx.post(up, files={"file": ("x", b"evil")}, headers=extra), "invalid signature")
    assert not sandbox.files.exists("signed/evil.txt")


def test_signatures_of_another_sandbox_do_not_cross(sandbox):
    other = Sandbox.create(template="agent", timeout=120)
    try:
        other.files.write("mine.txt", "other's")
        sandbox.files.write("mine.txt", "first's")
        assert httpx.get(other.download_url("mine.txt")).text == "other's"
        assert httpx.get(sandbox.download_url("mine.txt")).text == "first's"
        # The first sandbox's token, signing for the second: refused there.
        url = sandbox.download_url("mine.txt")
        r = httpx.get(
            url,
            headers={"Novita-Sandbox-Id": other.sandbox_id, "Novita-Sandbox-Port": "49983"},
        )
        assert_401(r, "invalid signature")
    finally:
        other.kill()


def test_unsecured_sandbox_urls_need_no_signature(server_url):
    sbx = Sandbox.create(template="agent", timeout=120, secure=False)
    try:
        assert sbx._envd_access_token is None
        sbx.files.write("open.txt", "open")
        url = sbx.download_url("open.txt")
        assert "signature" not in url
        # The NOVITA_SANDBOX_URL form names no sandbox: only Host routing
        # (or the SDK's headers) reaches an unsecured one.
        r = httpx.get(url, headers={"Novita-Sandbox-Id": sbx.sandbox_id, "Novita-Sandbox-Port": "49983"})
        assert r.status_code == 200 and r.text == "open"
    finally:
        sbx.kill()


def test_the_sdks_own_calls_still_work_with_the_token(sandbox):
    sandbox.files.write("t.txt", "with token")
    assert sandbox.files.read("t.txt") == "with token"
    assert sandbox.commands.run("echo ok").stdout == "ok\n"
    # Without the token, envd RPCs are refused.
    url = sandbox.envd_api_url.rstrip("/")
    r = httpx.post(
        f"{url}/filesystem.Filesystem/Stat",
        json={"path": "t.txt"},
        headers={"Novita-Sandbox-Id": sandbox.sandbox_id, "Novita-Sandbox-Port": "49983"},
    )
    assert r.status_code == 401, r.text
