"""A stand-in for the Google APIs that ``gcloud functions deploy --gen2`` calls.

Cloud Functions v2 (get, list, create, patch, delete, generateUploadUrl, operations,
runtimes), the signed upload URL it hands out, and the look-ups gcloud makes on the side:
Cloud Build's default service account, the project (for its number), Service Usage (is an API
enabled), Cloud Run's IAM policy on the function's service, Secret Manager (``gcloud
secrets versions access``), and Cloud Scheduler's jobs (list, create, patch)."""

from __future__ import annotations

import base64
import copy
import re
import uuid
from pathlib import Path
from typing import Any

from tests.google.server import Answer, JsonServer, Received, not_found

API_SERVICES = ("cloudfunctions", "cloudbuild", "cloudresourcemanager", "serviceusage", "run",
                "iam", "secretmanager", "artifactregistry", "storage", "logging",
                "cloudscheduler")  # fmt: skip
PROJECT_NUMBER = "123456789012"
_LOCATION = r"/v2/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)"


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(word.title() for word in rest)


class FunctionsApi(JsonServer):
    """Cloud Functions v2 and its neighbours, holding deployed functions in memory."""

    def __init__(self, secrets: dict[str, str] | None = None) -> None:
        super().__init__()
        self.functions: dict[str, dict[str, Any]] = {}
        self.uploads: dict[str, bytes] = {}
        self.secrets = dict(secrets or {})
        fn = _LOCATION + r"/functions/(?P<name>[^/:]+)"
        self.route("GET", fn, self._get)
        self.route("PATCH", fn, self._patch)
        self.route("DELETE", fn, self._delete)
        self.route("POST", _LOCATION + r"/functions", self._create)
        self.route("GET", _LOCATION + r"/functions", self._list)
        self.route("GET", r"/v1/projects/[^/]+/locations/[^/]+/functions",
                   lambda *_: Answer(200, {"functions": []}))  # no 1st gen functions  # fmt: skip
        self.route("POST", _LOCATION + r"/functions:generateUploadUrl", self._upload_url)
        self.route("GET", _LOCATION + r"/runtimes", self._runtimes)
        self.route("GET", r"/v[12]/projects/(?P<project>[^/]+)/locations", self._locations)
        self.route("GET", r"/v2/(?P<name>projects/.+/operations/.+)", self._operation)
        self.route("PUT", r"/upload/(?P<id>[0-9a-f]+)", self._receive_upload)
        self.route("GET", r"/v1/projects/[^/]+/locations/[^/]+/defaultServiceAccount",
                   self._build_account)  # fmt: skip
        self.route("GET", r"/v[13]/projects/(?P<project>[^/:]+)", self._project)
        self.route("POST", r"/v[13]/projects/(?P<project>[^/:]+):getIamPolicy",
                   lambda *_: Answer(200, {"bindings": []}))  # fmt: skip
        self.route("GET", r"/v1/projects/[^/]+/services/(?P<service>[^/]+)", self._service)
        self.route("GET", r"/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/]+)"
                   r"/versions/(?P<version>[^/:]+):access", self._secret)  # fmt: skip
        run_service = r"/v1/projects/[^/]+/locations/[^/]+/services/(?P<name>[^/:]+)"
        self.route("GET", run_service + ":getIamPolicy", self._run_policy)
        self.route("POST", run_service + ":setIamPolicy", self._set_run_policy)
        self.invokers: dict[str, list[dict[str, Any]]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        jobs = r"/v1/projects/[^/]+/locations/[^/]+/jobs"
        self.route("GET", jobs, lambda *_: Answer(200, {"jobs": list(self.jobs.values())}))
        self.route("POST", jobs, self._create_job)
        self.route("PATCH", jobs + r"/(?P<name>[^/:]+)", self._patch_job)
        self._operations: dict[str, dict[str, Any]] = {}

    def configure_gcloud(self, config_dir: Path, token_file: Path) -> dict[str, str]:
        """Environment for a real gcloud that talks to this stand-in and nothing else."""
        env = {
            "CLOUDSDK_CONFIG": str(config_dir),
            "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(token_file),
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
            "CLOUDSDK_SURVEY_DISABLE_PROMPTS": "true",
            "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
            "CLOUDSDK_METRICS_ENVIRONMENT": "tests",
            "NO_GCE_CHECK": "True",
        }
        for service in API_SERVICES:
            env[f"CLOUDSDK_API_ENDPOINT_OVERRIDES_{service.upper()}"] = self.url + "/"
        return env

    # Cloud Functions v2

    def _get(self, request: Received, match: re.Match[str]) -> Answer:
        function = self.functions.get(match["name"])
        if function is None:
            return not_found(f"Function {match['name']} does not exist")
        return Answer(200, function)

    def _list(self, request: Received, match: re.Match[str]) -> Answer:
        region = match["region"]
        found = [f for f in self.functions.values() if region in ("-", f["name"].split("/")[3])]
        return Answer(200, {"functions": found})

    def _create(self, request: Received, match: re.Match[str]) -> Answer:
        name = request.query["functionId"][0]
        function = request.json()
        function["name"] = (
            f"projects/{match['project']}/locations/{match['region']}/functions/{name}"
        )
        self.functions[name] = self._deployed(function, match)
        return self._done(match, self.functions[name])

    def _patch(self, request: Received, match: re.Match[str]) -> Answer:
        stored = self.functions.get(match["name"])
        if stored is None:
            return not_found(f"Function {match['name']} does not exist")
        self._apply_mask(stored, request)
        return self._done(match, self._deployed(stored, match))

    def _delete(self, request: Received, match: re.Match[str]) -> Answer:
        function = self.functions.pop(match["name"], None)
        if function is None:
            return not_found(f"Function {match['name']} does not exist")
        return self._done(match, function)

    @classmethod
    def _apply_mask(cls, stored: dict[str, Any], request: Received) -> None:
        """Copy into ``stored`` each field the request's ``updateMask`` names (snake_case or
        camelCase paths), deleting those the body leaves out."""
        patch = request.json()
        for path in request.query.get("updateMask", [""])[0].split(","):
            if path:
                cls._apply(stored, patch, [_camel(part) for part in path.split(".")])

    @staticmethod
    def _apply(stored: dict[str, Any], patch: dict[str, Any], keys: list[str]) -> None:
        """Copy the field at ``keys`` from ``patch`` into ``stored``, or delete it there."""
        *parents, last = keys
        source: Any = patch
        target = stored
        for key in parents:
            source = source.get(key, {}) if isinstance(source, dict) else {}
            target = target.setdefault(key, {})
        if isinstance(source, dict) and last in source:
            target[last] = copy.deepcopy(source[last])
        else:
            target.pop(last, None)

    def _deployed(self, function: dict[str, Any], match: re.Match[str]) -> dict[str, Any]:
        function["state"] = "ACTIVE"
        function["environment"] = "GEN_2"
        service = function.setdefault("serviceConfig", {})
        name = function["name"].rsplit("/", 1)[-1]
        service["uri"] = f"https://{name}-{PROJECT_NUMBER}.{match['region']}.run.app"
        function["url"] = service["uri"]
        service["service"] = (
            f"projects/{match['project']}/locations/{match['region']}/services/{name}"
        )
        trigger = function.get("eventTrigger")
        if trigger is not None:  # the Eventarc trigger the API creates for an event function
            trigger.setdefault(
                "trigger",
                f"projects/{match['project']}/locations/{match['region']}/triggers/"
                f"{name}-{uuid.uuid4().hex[:6]}",
            )
            trigger.setdefault("triggerRegion", match["region"])
        return function

    def _done(self, match: re.Match[str], function: dict[str, Any]) -> Answer:
        name = (
            f"projects/{match['project']}/locations/{match['region']}/operations/{uuid.uuid4().hex}"
        )
        operation = {
            "name": name,
            "done": True,
            "metadata": {
                "@type": "type.googleapis.com/google.cloud.functions.v2.OperationMetadata",
                "target": function["name"],
                "stages": [{"name": stage, "state": "COMPLETE"} for stage in ("BUILD", "SERVICE")],
            },
            "response": {
                "@type": "type.googleapis.com/google.cloud.functions.v2.Function",
                **function,
            },
        }
        self._operations[name] = operation
        return Answer(200, operation)

    def _operation(self, request: Received, match: re.Match[str]) -> Answer:
        operation = self._operations.get(match["name"])
        return Answer(200, operation) if operation else not_found("no such operation")

    def _upload_url(self, request: Received, match: re.Match[str]) -> Answer:
        upload = uuid.uuid4().hex
        return Answer(200, {
            "uploadUrl": f"{self.url}/upload/{upload}",
            "storageSource": {"bucket": "gcf-v2-uploads-stand-in", "object": f"{upload}.zip"},
        })  # fmt: skip

    def _receive_upload(self, request: Received, match: re.Match[str]) -> Answer:
        self.uploads[match["id"]] = request.body
        return Answer(200, b"", "text/plain")

    def _locations(self, request: Received, match: re.Match[str]) -> Answer:
        regions = {"europe-west1", *(f["name"].split("/")[3] for f in self.functions.values())}
        return Answer(200, {"locations": [
            {"name": f"projects/{match['project']}/locations/{region}", "locationId": region}
            for region in sorted(regions)
        ]})  # fmt: skip

    def _runtimes(self, request: Received, match: re.Match[str]) -> Answer:
        runtimes = [
            {"name": f"python3{minor}", "environment": "GEN_2", "stage": "GA"}
            for minor in (10, 11, 12, 13, 14)
        ]
        return Answer(200, {"runtimes": runtimes})

    # The look-ups gcloud makes on the side

    def _build_account(self, request: Received, match: re.Match[str]) -> Answer:
        email = f"{PROJECT_NUMBER}-compute@developer.gserviceaccount.com"
        return Answer(200, {"serviceAccountEmail": f"projects/-/serviceAccounts/{email}"})

    def _project(self, request: Received, match: re.Match[str]) -> Answer:
        project = match["project"]
        return Answer(200, {"projectId": project, "projectNumber": PROJECT_NUMBER,
                            "name": f"projects/{PROJECT_NUMBER}",
                            "lifecycleState": "ACTIVE"})  # fmt: skip

    def _service(self, request: Received, match: re.Match[str]) -> Answer:
        return Answer(200, {"name": match["service"], "state": "ENABLED"})

    def _run_policy(self, request: Received, match: re.Match[str]) -> Answer:
        return Answer(200, {"bindings": self.invokers.get(match["name"], []), "etag": "BwY="})

    def _set_run_policy(self, request: Received, match: re.Match[str]) -> Answer:
        policy = request.json()["policy"]
        self.invokers[match["name"]] = policy.get("bindings", [])
        return Answer(200, policy)

    def _create_job(self, request: Received, match: re.Match[str]) -> Answer:
        job = request.json()
        name = job["name"].rsplit("/", 1)[-1]
        if name in self.jobs:
            return Answer(409, {"error": {"code": 409, "message": "Job already exists",
                                          "status": "ALREADY_EXISTS"}})  # fmt: skip
        self.jobs[name] = {**job, "state": "ENABLED"}
        return Answer(200, self.jobs[name])

    def _patch_job(self, request: Received, match: re.Match[str]) -> Answer:
        stored = self.jobs.get(match["name"])
        if stored is None:
            return not_found(f"Job {match['name']} not found")
        self._apply_mask(stored, request)
        return Answer(200, stored)

    def _secret(self, request: Received, match: re.Match[str]) -> Answer:
        value = self.secrets.get(match["secret"])
        if value is None:
            return not_found(f"Secret {match['secret']} not found")
        data = base64.b64encode(value.encode()).decode()
        return Answer(200, {"name": request.path.rsplit(":", 1)[0], "payload": {"data": data}})
