"""A small client for Label Studio's HTTP API: projects, task import, annotations out.

Why not the ``label-studio-sdk`` package: Label Studio's pins clash with distill's
(openai<2, pyarrow<25, pytz<2023), so it lives in an environment of its own, and the few
calls distill makes are plain JSON over HTTP. The API token is read from the environment
variable the config names and sent only in the Authorization header: never logged, never
in an error message, never written to a file.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any, Optional


class LabelStudioError(RuntimeError):
    """Label Studio could not do what was asked; the message says what, where, and what to do (one line)."""


class ProjectGone(LabelStudioError):
    """The project the review state names no longer exists."""


class LabelStudio:
    """One Label Studio server, one token."""

    def __init__(self, url: str, *, token_env: str, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.token_env = token_env
        self.timeout_s = timeout_s
        token = os.environ.get(token_env, "")
        if not token:
            raise LabelStudioError(
                f"no Label Studio API token: set the environment variable {token_env} (review.api_key_env) to the "
                "token of the reviewer account distill acts as (`distill up --labelstudio` prints where it is)"
            )
        self._auth = f"Token {token}"

    def _call(self, method: str, path: str, body: Any = None, *, ok404: bool = False) -> Any:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", self._auth)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 404 and ok404:
                return None
            detail = e.read()[:300].decode("utf-8", "replace").replace("\n", " ")
            hint = " (check the token in " + self.token_env + ")" if e.code in (401, 403) else ""
            raise LabelStudioError(f"Label Studio {method} {path} answered {e.code}{hint}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise LabelStudioError(
                f"Label Studio at {self.url} is not reachable ({reason}): start it with `distill up --labelstudio` "
                "or point review.url at yours"
            ) from None
        return json.loads(raw) if raw else None

    # projects
    def project(self, project_id: int) -> Optional[dict[str, Any]]:
        """The project, or None when it does not exist (any more)."""
        return self._call("GET", f"/api/projects/{project_id}", ok404=True)

    def find_project(self, title: str) -> Optional[dict[str, Any]]:
        """The newest project with this exact title, or None."""
        page, found = 1, None
        while True:
            res = self._call("GET", f"/api/projects?page={page}&page_size=100")
            items = res.get("results", res) if isinstance(res, dict) else res
            for p in items or []:
                if p.get("title") == title and (found is None or p["id"] > found["id"]):
                    found = p
            if not isinstance(res, dict) or not res.get("next"):
                return found
            page += 1

    def create_project(self, title: str, label_config: str, description: str = "") -> dict[str, Any]:
        return self._call(
            "POST", "/api/projects", {"title": title, "label_config": label_config, "description": description}
        )

    def delete_project(self, project_id: int) -> None:
        self._call("DELETE", f"/api/projects/{project_id}")

    # tasks and annotations
    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> int:
        """Create the tasks (with their predictions) in one request; returns how many were created."""
        if not tasks:
            return 0
        res = self._call("POST", f"/api/projects/{project_id}/import", tasks)
        return int((res or {}).get("task_count", len(tasks)))

    def tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of the project with its annotations (paged through)."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            res = self._call("GET", f"/api/tasks?project={project_id}&page={page}&page_size=500&fields=all", ok404=True)
            items = (res or {}).get("tasks", []) if isinstance(res, dict) else (res or [])
            out.extend(items)
            total = res.get("total") if isinstance(res, dict) else None
            if not items or total is None or len(out) >= int(total):
                return out
            page += 1

    def annotate(self, task_id: int, label: str, *, from_name: str, to_name: str) -> dict[str, Any]:
        """Post an annotation choosing ``label``, as a reviewer does in the UI (tests and scripted reviews)."""
        result = [{"from_name": from_name, "to_name": to_name, "type": "choices", "value": {"choices": [label]}}]
        return self._call("POST", f"/api/tasks/{task_id}/annotations", {"result": result})
