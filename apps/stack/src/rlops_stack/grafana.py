"""Pushing the built dashboards into a Grafana (``rlops dashboards push``): one folder, upserts by uid."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaUnauthorizedError
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import RequestException, Timeout

TOKEN_ENV = "RLOPS_GRAFANA_TOKEN"


def folder_uid(title: str) -> str:
    """The uid rlops gives a folder it creates: the title in lower case, runs of other characters as '-'."""
    uid = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40]
    return uid or "rlops"


def upsert_payload(board: dict[str, Any], folder: str | None, message: str) -> dict[str, Any]:
    """The body of ``POST /api/dashboards/db`` that creates or replaces ``board`` (matched by uid)."""
    dashboard_json = dict(board)
    # Without an id Grafana matches by uid: the same file updates the same dashboard in every Grafana.
    dashboard_json.pop("id", None)
    dashboard_json.pop("version", None)
    payload: dict[str, Any] = {"dashboard": dashboard_json, "overwrite": True, "message": message}
    if folder is not None:
        payload["folderUid"] = folder
    return payload


@dataclass
class PushResult:
    uid: str
    title: str
    url: str
    version: int | None
    status: str


class GrafanaError(RuntimeError):
    """Grafana could not be reached, refused the token, or refused a dashboard; the message says which."""


def _grafana_error(url: str, action: str, exc: Exception) -> GrafanaError:
    if isinstance(exc, GrafanaUnauthorizedError):
        return GrafanaError(
            f"Grafana at {url} refused the credentials (401) while {action}: pass a valid service account "
            f"token with --token (or ${TOKEN_ENV}), with the Editor role or dashboards:write"
        )
    if isinstance(exc, GrafanaClientError) and exc.status_code == 403:
        return GrafanaError(
            f"Grafana at {url} says the token may not do this (403) while {action}: it needs the Editor role "
            f"or dashboards:write and folders:create ({exc.message})"
        )
    if isinstance(exc, GrafanaException):
        return GrafanaError(f"Grafana at {url} answered {exc.status_code} while {action}: {exc.message}")
    if isinstance(exc, Timeout):
        return GrafanaError(f"Grafana at {url} did not answer in time while {action} ({exc})")
    if isinstance(exc, RequestsConnectionError):
        return GrafanaError(
            f"Grafana at {url} cannot be reached while {action} ({exc}); check --url and that it runs"
        )
    return GrafanaError(f"Grafana at {url}: {action} failed: {exc}")


_GRAFANA_ERRORS = (GrafanaException, RequestException, ValueError)
"""What grafana-client raises: HTTP answers >= 400, transport failures, and bodies that are not JSON."""


def client(url: str, token: str | None, timeout: float = 10.0, verify: bool = True) -> GrafanaApi:
    """A grafana-client API for ``url`` (``http(s)://[user:password@]host[:port][/path]``).

    With a token it authenticates as a service account; without one, with the URL's user and password.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise GrafanaError(f"--url {url!r}: expected http(s)://HOST[:PORT][/PATH], the address of a Grafana")
    try:
        port = parts.port
    except ValueError as e:
        raise GrafanaError(f"--url {url!r}: {e}") from None
    auth: str | tuple[str, str] | None = token or None
    if auth is None and parts.username:
        auth = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
    if auth is None:
        raise GrafanaError(
            f"no credentials for Grafana at {url}: pass --token (or set ${TOKEN_ENV}) with a service account "
            "token, or put user:password in the URL"
        )
    # grafana-client appends "api" to the path as given: a sub-path needs its trailing slash.
    prefix = parts.path.strip("/")
    return GrafanaApi(
        auth=auth,
        host=parts.hostname,
        port=port,
        url_path_prefix=f"{prefix}/" if prefix else "",
        protocol=parts.scheme,
        verify=verify,
        timeout=timeout,
    )


def ensure_folder(api: GrafanaApi, url: str, title: str) -> str:
    """The uid of the folder titled ``title``, created (with uid :func:`folder_uid`) if there is none."""
    try:
        folders = api.folder.get_all_folders()
        for folder in folders or []:
            if folder.get("title") == title:
                return str(folder["uid"])
        created = api.folder.create_folder(title, uid=folder_uid(title))
    except _GRAFANA_ERRORS as e:
        raise _grafana_error(url, f"finding or creating the folder {title!r}", e) from e
    return str(created["uid"])


def push(
    boards: Sequence[dict[str, Any]],
    url: str,
    token: str | None,
    *,
    folder: str | None = "rlops",
    message: str = "rlops dashboards push",
    timeout: float = 10.0,
    verify: bool = True,
) -> list[PushResult]:
    """Create or replace every dashboard of ``boards`` in the Grafana at ``url`` (into ``folder``, created
    if missing; None: the General folder). Stops at the first refusal, naming the dashboard."""
    api = client(url, token, timeout, verify)
    folder_ref = ensure_folder(api, url, folder) if folder else None
    results = []
    for board in boards:
        uid, title = board.get("uid"), board.get("title")
        try:
            answer = api.dashboard.update_dashboard(upsert_payload(board, folder_ref, message))
        except _GRAFANA_ERRORS as e:
            raise _grafana_error(url, f"saving dashboard {uid!r} ({title})", e) from e
        if not isinstance(answer, dict):
            raise GrafanaError(f"Grafana at {url} answered {answer!r} to saving {uid!r}, not a JSON object")
        link = str(answer.get("url") or "")
        results.append(
            PushResult(
                uid=str(answer.get("uid", uid)),
                title=str(title),
                url=url.rstrip("/") + link if link.startswith("/") else link,
                version=answer.get("version"),
                status=str(answer.get("status", "")),
            )
        )
    return results
