"""The UI's only way to the models: HTTP calls to the thali REST API, with errors a person can read.

No torch, no onnxruntime, no training code: the UI is a client like any other."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import requests

API_ENV = "THALI_API_URL"
DEFAULT_API = "http://127.0.0.1:8000"


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

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
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
        try:
            body = response.json()
        except ValueError:
            raise ApiProblem(
                f"{url} answered {response.status_code} without JSON: is {self.base} a thali API?",
                response.status_code,
            ) from None
        if response.status_code >= 400:
            message = body.get("message") if isinstance(body, dict) else None
            code = body.get("code") if isinstance(body, dict) else None
            raise ApiProblem(str(message or f"HTTP {response.status_code}"), response.status_code, code)
        return body

    def domains(self) -> dict[str, Any]:
        return self._call("GET", "/v1/domains")

    def card(self, domain: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/domains/{domain}/card")

    def predict(self, domain: str, name: str, data: bytes, top_k: int, explain: bool) -> dict[str, Any]:
        params = {"top_k": top_k, "explain": "true" if explain else "false"}
        files = {"image": (name, data, "application/octet-stream")}
        return self._call("POST", f"/v1/domains/{domain}/predict", files=files, params=params)
