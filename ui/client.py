"""The UI's only way to the models: HTTP calls to the thali REST API, with errors a person can read.

No torch, no onnxruntime, no training code: the UI is a client like any other."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import requests

API_ENV = "THALI_API_URL"
DEFAULT_API = "http://127.0.0.1:8000"
FEEDBACK_KEY_ENV = "THALI_FEEDBACK_KEY"
NONE_OF_THESE = "none_of_these"  # the label of a photo that is none of the domain's classes


def api_url() -> str:
    return (os.environ.get(API_ENV) or DEFAULT_API).rstrip("/")


class ApiProblem(Exception):
    """What went wrong, as one sentence for the page (never a stack trace)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


@dataclass
class Client:
    base: str
    timeout: float = 30.0

    def _headers(self) -> dict[str, str]:
        """The feedback key of this UI's process ($THALI_FEEDBACK_KEY), for servers that want one."""
        key = os.environ.get(FEEDBACK_KEY_ENV)
        return {"X-Feedback-Key": key} if key else {}

    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """The response, or an :class:`ApiProblem` naming what failed (unreachable, slow, HTTP 4xx/5xx)."""
        url = self.base + path
        try:
            response = requests.request(method, url, timeout=self.timeout, **kwargs)
        except requests.ConnectionError:
            raise ApiProblem(
                f"The thali API is not reachable at {self.base}. Is `thali serve` running?"
            ) from None
        except requests.Timeout:
            raise ApiProblem(
                f"The thali API at {self.base} did not answer within {self.timeout:g} s."
            ) from None
        except requests.RequestException as exc:
            raise ApiProblem(f"Could not talk to the thali API at {self.base}: {exc}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise ApiProblem(
                    f"{url} answered {response.status_code} without JSON: is {self.base} a thali API?",
                    response.status_code,
                )
            message, code = body.get("message"), body.get("code")
            raise ApiProblem(str(message or f"HTTP {response.status_code}"), response.status_code, code)
        return response

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ApiProblem(
                f"{response.url} answered {response.status_code} without JSON: is {self.base} a thali API?",
                response.status_code,
            ) from None

    def domains(self) -> dict[str, Any]:
        return self._call("GET", "/v1/domains")

    def card(self, domain: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/domains/{domain}/card")

    def predict(self, domain: str, name: str, data: bytes, top_k: int, explain: bool) -> dict[str, Any]:
        params = {"top_k": top_k, "explain": "true" if explain else "false"}
        files = {"image": (name, data, "application/octet-stream")}
        return self._call("POST", f"/v1/domains/{domain}/predict", files=files, params=params)

    def feedback(
        self, domain: str, name: str, data: bytes, label: str, note: str | None = None
    ) -> dict[str, Any]:
        """Send a correction: the photo and the class it really shows (a class name, or ``none_of_these``)."""
        form = {"label": label, **({"note": note} if note else {})}
        files = {"image": (name, data, "application/octet-stream")}
        return self._call(
            "POST", f"/v1/domains/{domain}/feedback", files=files, data=form, headers=self._headers()
        )

    def feedback_list(self, domain: str, limit: int = 200) -> dict[str, Any]:
        """The domain's corrections: ``total``, ``counts`` per label (agreed, corrected), the newest
        ``records``."""
        return self._call(
            "GET", f"/v1/domains/{domain}/feedback", params={"limit": limit}, headers=self._headers()
        )

    def feedback_photo(self, domain: str, sha256: str) -> bytes:
        """The bytes of a photo in the domain's feedback store."""
        path = f"/v1/domains/{domain}/feedback/photos/{sha256}"
        return self._send("GET", path, headers=self._headers()).content
