"""The error tree: structured fields, hints, exit codes and no secrets in messages."""

from __future__ import annotations

import pytest

from bridgekit.errors import (
    ApiError,
    AuthError,
    BridgekitError,
    ConfigError,
    ExitCode,
    PermissionDeniedError,
    RunbookFailed,
    ThrottledError,
    TransientError,
    exit_code_for,
    redact,
)


def test_tree_and_transient_marker() -> None:
    assert issubclass(ThrottledError, TransientError) and issubclass(TransientError, ApiError)
    assert issubclass(ApiError, BridgekitError)
    assert ThrottledError("x").transient and not ConfigError("x").transient


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BridgekitError("x"), ExitCode.ERROR),
        (ConfigError("x"), ExitCode.USAGE),
        (AuthError("x"), ExitCode.AUTH),
        (PermissionDeniedError("x", status=403), ExitCode.AUTH),
        (ThrottledError("x", retry_after=3), ExitCode.TRANSIENT),
        (RunbookFailed("x", exit_code=ExitCode.CHECK_FAILED), ExitCode.CHECK_FAILED),
    ],
)
def test_exit_codes(error: BridgekitError, code: ExitCode) -> None:
    assert exit_code_for(error) == code


def test_rendering_has_message_and_hint() -> None:
    err = AuthError("token request refused (AADSTS7000215)", service_code="AADSTS7000215",
                    hint="check the secret in $CONTOSO_SECRET")
    assert str(err) == "token request refused (AADSTS7000215) (hint: check the secret in $CONTOSO_SECRET)"
    assert err.to_dict()["service_code"] == "AADSTS7000215"


def test_api_error_fields() -> None:
    err = ApiError("not found", status=404, service_code="0x80040217", request_id="r-1", service="dataverse",
                   url="https://x/api/data/v9.2/accounts?access_token=abcdef123456")
    assert (err.status, err.service_code, err.request_id) == (404, "0x80040217", "r-1")
    assert err.url is not None and "abcdef123456" not in err.url


def test_no_token_in_messages() -> None:
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL3gifQ.c2lnbmF0dXJlc2lnbmF0dXJl"
    err = ApiError(f"bad request with Authorization: Bearer {jwt}", hint=f"token {jwt}")
    assert jwt not in str(err) and jwt not in err.hint
    assert redact("client_secret=s3cret&scope=x") == "client_secret=***&scope=x"
