"""What ``deploy.sh`` does: check the settings, share the connection budget, migrate, deploy.

``deploy.sh`` documents the arguments and settings and runs this module with the project's
Python (``python -m ops.deploy``). Every problem with the settings is reported, one line each,
before any command runs; each command is printed (``+ gcloud ...``) before it runs, and
``--dry-run`` prints them only. A password is never read from the environment, never passed
as a plain variable and never printed: a secret's value is fetched with gcloud and reaches
only the migration's environment.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSWORD_FILE = "/etc/secrets/db-pass"  # noqa: S105  # where the secret is mounted
# db/config.py's, repeated: deploy.sh may run on a Python without the project's dependencies.
_INSTANCE_CONNECTION_NAME = re.compile(r"^([a-z0-9.-]+:)?[a-z0-9-]+:[a-z0-9-]+:[a-z0-9-]+$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_DEFAULTS = {
    "DB_IAM_AUTH": "false",
    "DB_IP_TYPE": "PUBLIC",
    "CONCURRENCY": "8",
    "DB_MAX_OVERFLOW": "0",
    "CPU": "1",
    "MEMORY": "512Mi",
    "TIMEOUT": "60s",
    "RUNTIME": "python313",
    "LOG_LEVEL": "INFO",
    "DB_MAX_CONNECTIONS": "100",
    "DB_RESERVED_CONNECTIONS": "10",
    "DB_OWNER_IAM_AUTH": "false",
    "EVENT_INSTANCES": "2",
    "MIN_INSTANCES": "0",
    "ALLOW_CROSS_REGION": "false",
    "RELAY_SCHEDULE": "* * * * *",
}
# The Python runtimes of Cloud Run functions this project runs on (3.11 and newer); the suite
# runs on the oldest and the newest of those it can install.
RUNTIMES = ("python311", "python312", "python313", "python314")


class Refused(Exception):
    """The deploy stops before running anything: one line per problem, exit status 2."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class EntryPoint:
    """A function of main.py: ``topic`` for an event function, None for an HTTP one;
    ``part_of_api`` for an HTTP function serving a router of ``web/routes.py`` other than
    ``API``, whose routes the ``api`` function serves too; ``relay`` for the outbox's relay."""

    name: str
    topic: str | None = None
    part_of_api: bool = False
    relay: bool = False  # the outbox's relay (``relay.serve``), called by Cloud Scheduler


def _returned_call(node: ast.FunctionDef, function: str) -> ast.Call | None:
    """The call of a body that is ``return FUNCTION(...)`` alone, or None."""
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    if len(body) != 1 or not isinstance(body[0], ast.Return):
        return None
    call = body[0].value
    if not isinstance(call, ast.Call) or ast.unparse(call.func) != function:
        return None
    return call


def _serves_part_of_api(node: ast.FunctionDef) -> bool:
    """True for ``return http.serve(request, database, routes.NAME)`` with NAME not API."""
    call = _returned_call(node, "http.serve")
    if call is None:
        return False
    router = call.args[2] if len(call.args) == 3 else None
    return (
        isinstance(router, ast.Attribute)
        and ast.unparse(router.value) == "routes"
        and router.attr != "API"
    )


def entry_points(source: Path) -> list[EntryPoint]:
    """The functions ``source`` (main.py) registers, read without importing anything."""
    found = []
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        decorators = [ast.unparse(decorator) for decorator in node.decorator_list]
        if "functions_framework.http" in decorators:
            found.append(
                EntryPoint(
                    node.name,
                    part_of_api=_serves_part_of_api(node),
                    relay=_returned_call(node, "relay.serve") is not None,
                )
            )
        elif "functions_framework.cloud_event" in decorators:
            topics = [
                keyword.value.value
                for decorator in node.decorator_list
                if isinstance(decorator, ast.Call)
                for keyword in decorator.keywords
                if keyword.arg == "topic" and isinstance(keyword.value, ast.Constant)
            ]
            if len(topics) != 1:
                raise Refused(
                    f"main.py: {node.name} needs event_scope(..., topic='NAME') to be deployed"
                )
            found.append(EntryPoint(node.name, str(topics[0])))
    if not found:
        raise Refused("main.py has no @functions_framework.http or .cloud_event function")
    return found


@dataclass
class Options:
    """The command line: what to deploy and how."""

    dry_run: bool = False
    migrate: bool = False
    prune: bool = False
    access: str = "--no-allow-unauthenticated"
    chosen: list[str] = field(default_factory=list)


def parse_arguments(args: Sequence[str], names: Sequence[str]) -> Options:
    """The options and functions named on the command line; ``Refused`` for a bad one."""
    options = Options()
    for argument in args:
        if argument == "--dry-run":
            options.dry_run = True
        elif argument == "--migrate":
            options.migrate = True
        elif argument == "--prune":
            options.prune = True
        elif argument == "--allow-unauthenticated":
            options.access = "--allow-unauthenticated"
        elif argument.startswith("-"):
            raise Refused(f"unknown option {argument} (see --help)")
        elif argument not in names:
            raise Refused(f"unknown function '{argument}'; main.py has: {' '.join(names)}")
        elif argument in options.chosen:
            raise Refused(f"{argument} is named twice")
        else:
            options.chosen.append(argument)
    return options


def default_fleet(found: Sequence[EntryPoint], chosen: Sequence[str]) -> list[str]:
    """What a deployment holds when ``FUNCTIONS`` is not set: every entry point but those
    serving part of ``api``'s routes, and those too when named on the command line."""
    fleet = [entry.name for entry in found if not entry.part_of_api]
    return fleet + [name for name in chosen if name not in fleet]


class Settings:
    """The settings from the environment, with their defaults; ``problems`` lists what is wrong."""

    def __init__(
        self, environ: Mapping[str, str], found: Sequence[EntryPoint], options: Options
    ) -> None:
        # As the shell's ${NAME:-default}: an empty value counts as unset.
        self.given = {name: value for name, value in environ.items() if value}
        self.values = {**_DEFAULTS, **self.given}
        self.values.setdefault("TRIGGER_SERVICE_ACCOUNT", self.get("SERVICE_ACCOUNT"))
        self.values.setdefault("SCHEDULER_SERVICE_ACCOUNT", self.get("TRIGGER_SERVICE_ACCOUNT"))
        self.mode = "url" if self.get("DATABASE_URL_SECRET") else "connector"
        names = [entry.name for entry in found]
        if "FUNCTIONS" in self.given:
            self.fleet = self.get("FUNCTIONS").replace(",", " ").split()
        else:
            self.fleet = default_fleet(found, options.chosen)
        self.problems: list[str] = []
        self._check(names, options)

    def get(self, name: str, default: str = "") -> str:
        return self.values.get(name, default)

    def number(self, name: str) -> int:
        return int(self.get(name))

    def _check(self, names: Sequence[str], options: Options) -> None:
        self._check_database()
        self._check_fleet(names, options)
        self._check_accounts()
        self._check_password()
        if options.migrate:
            self._check_migration()
        self._check_values()

    def _check_database(self) -> None:
        problem = self.problems.append
        if self.mode == "url":
            for name in ("INSTANCE_CONNECTION_NAME", "DB_NAME", "DB_USER", "DB_PASS_SECRET",
                         "DB_IAM_AUTH", "DB_IP_TYPE", "DB_OWNER", "DB_OWNER_PASS_SECRET",
                         "DB_OWNER_IAM_AUTH"):  # fmt: skip
                if name in self.given:
                    problem(f"{name} has no use with DATABASE_URL_SECRET; set one or the other")
        else:
            for name in ("INSTANCE_CONNECTION_NAME", "DB_NAME", "DB_USER"):
                if not self.get(name):
                    problem(f"{name} is not set (or set DATABASE_URL_SECRET)")
        instance = self.get("INSTANCE_CONNECTION_NAME")
        if instance and not _INSTANCE_CONNECTION_NAME.match(instance):
            problem(
                f"INSTANCE_CONNECTION_NAME must look like project:region:instance, got '{instance}'"
            )
        ip_type = self.get("DB_IP_TYPE")
        if ip_type in ("PRIVATE", "PSC"):
            if not self.get("VPC_CONNECTOR"):
                problem(
                    f"DB_IP_TYPE={ip_type} needs VPC_CONNECTOR: a function reaches the VPC"
                    " only through one"
                )
        elif ip_type != "PUBLIC":
            problem(f"DB_IP_TYPE must be PUBLIC, PRIVATE or PSC, got '{ip_type}'")
        region = self.get("REGION")
        if (
            instance
            and region
            and _INSTANCE_CONNECTION_NAME.match(instance)
            and instance.split(":")[-2] != region
            and self.get("ALLOW_CROSS_REGION") != "true"
        ):
            problem(
                f"REGION is {region} but the instance {instance} is in {instance.split(':')[-2]}:"
                " every round trip to the database would leave the region; deploy to"
                f" {instance.split(':')[-2]}, or set ALLOW_CROSS_REGION=true if that is meant"
            )

    def _check_fleet(self, names: Sequence[str], options: Options) -> None:
        problem = self.problems.append
        if not self.fleet:
            problem("FUNCTIONS names no function")
        seen: list[str] = []
        for name in self.fleet:
            if name not in names:
                problem(f"FUNCTIONS names '{name}', which is not an entry point of main.py")
            if name in seen:
                problem(f"FUNCTIONS names '{name}' twice")
            seen.append(name)
        for name in options.chosen:
            if name not in self.fleet:
                problem(
                    f"{name} is not in FUNCTIONS ({' '.join(self.fleet)}), whose share of"
                    " connections it would take; add it there"
                )

    def _check_accounts(self) -> None:
        for name in ("PROJECT_ID", "REGION", "SERVICE_ACCOUNT"):
            if not self.get(name):
                self.problems.append(f"{name} is not set")
        for name in ("SERVICE_ACCOUNT", "BUILD_SERVICE_ACCOUNT", "TRIGGER_SERVICE_ACCOUNT",
                     "SCHEDULER_SERVICE_ACCOUNT"):  # fmt: skip
            value = self.get(name)
            if value and not _EMAIL.match(value):
                self.problems.append(f"{name} must be a service account email, got '{value}'")

    def _check_password(self) -> None:
        if self.mode != "connector":
            return
        iam = self.get("DB_IAM_AUTH")
        if iam == "true" and self.get("DB_PASS_SECRET"):
            self.problems.append("DB_PASS_SECRET must not be set when DB_IAM_AUTH=true")
        elif iam == "false" and not self.get("DB_PASS_SECRET"):
            self.problems.append("DB_PASS_SECRET is not set (or set DB_IAM_AUTH=true)")
        elif iam not in ("true", "false"):
            self.problems.append(f"DB_IAM_AUTH must be true or false, got '{iam}'")

    def _check_migration(self) -> None:
        problem = self.problems.append
        if self.mode == "url":
            if not self.get("MIGRATION_DATABASE_URL_SECRET"):
                problem(
                    "--migrate needs MIGRATION_DATABASE_URL_SECRET: the schema owner's"
                    " DATABASE_URL, not the functions'"
                )
            return
        owner = self.get("DB_OWNER")
        if not owner:
            problem(
                "--migrate needs DB_OWNER: the database user that owns the schema, not the"
                " functions' DB_USER"
            )
        elif owner == self.get("DB_USER"):
            problem(
                "DB_OWNER must not be DB_USER: the functions must not own the tables they serve"
            )
        owner_iam = self.get("DB_OWNER_IAM_AUTH")
        if owner_iam == "true" and self.get("DB_OWNER_PASS_SECRET"):
            problem("DB_OWNER_PASS_SECRET must not be set when DB_OWNER_IAM_AUTH=true")
        elif owner_iam == "false" and not self.get("DB_OWNER_PASS_SECRET"):
            problem("--migrate needs DB_OWNER_PASS_SECRET (or DB_OWNER_IAM_AUTH=true)")
        elif owner_iam not in ("true", "false"):
            problem(f"DB_OWNER_IAM_AUTH must be true or false, got '{owner_iam}'")

    def _check_values(self) -> None:
        problem = self.problems.append
        schedule = self.get("RELAY_SCHEDULE")
        if len(schedule.split()) != 5 or not re.fullmatch(r"[0-9*/,\- ]+", schedule):
            problem(f"RELAY_SCHEDULE must be a cron schedule of 5 fields, got '{schedule}'")
        level = self.get("LOG_LEVEL")
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problem(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got '{level}'")
        for name, least in (("CONCURRENCY", 1), ("DB_MAX_OVERFLOW", 0),
                            ("DB_MAX_CONNECTIONS", 1), ("DB_RESERVED_CONNECTIONS", 0),
                            ("EVENT_INSTANCES", 1), ("MIN_INSTANCES", 0)):  # fmt: skip
            value = self.get(name)
            if not (value.isascii() and value.isdigit() and int(value) >= least):
                problem(f"{name} must be a whole number of at least {least}, got '{value}'")
        if self.get("ALLOW_CROSS_REGION") not in ("true", "false"):
            problem(
                f"ALLOW_CROSS_REGION must be true or false, got '{self.get('ALLOW_CROSS_REGION')}'"
            )
        runtime = self.get("RUNTIME")
        if runtime not in RUNTIMES:
            problem(
                f"RUNTIME must be one of {', '.join(RUNTIMES)} (Python 3.11 or newer), got"
                f" '{runtime}'"
            )
        cpu = self.get("CPU")
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", cpu):
            problem(f"CPU must be a number of vCPUs, got '{cpu}'")
        if cpu.startswith("0") and self.get("CONCURRENCY") != "1":
            problem(f"CONCURRENCY above 1 needs CPU of at least 1, got CPU={cpu}")


def show(command: Sequence[str]) -> None:
    """Print a command as it will run."""
    print("+", shlex.join(command), flush=True)


def secret_ref(secret: str) -> str:
    """A secret named NAME or NAME:VERSION, as NAME:VERSION (the latest version by default)."""
    return secret if ":" in secret else f"{secret}:latest"


def share(
    fleet: Sequence[str],
    topics: Mapping[str, str | None],
    slots: int,
    event_instances: int,
    relays: Collection[str] = (),
) -> dict[str, int]:
    """Each function's most instances, out of ``slots`` instances for the whole deployment.

    A relay gets one: the scheduler calls it once a minute. An event function gets
    ``event_instances`` (no more than an even share): Pub/Sub holds what waits, and pushes at
    the pace the function keeps. The HTTP functions split the rest evenly, the first ones in
    ``fleet`` taking what does not divide, since a caller waits on them. With no HTTP
    function, the event functions split every slot.
    """
    events = [name for name in fleet if topics.get(name)]
    http = [name for name in fleet if not topics.get(name) and name not in relays]
    most = {name: min(1, slots) for name in fleet if name in relays}
    even = slots // len(fleet)
    if http:
        most.update({name: min(event_instances, even) for name in events})
    takers = http or events
    rest = max(slots - sum(most.values()), 0)
    for index, name in enumerate(takers):
        most[name] = rest // len(takers) + (1 if index < rest % len(takers) else 0)
    return {name: most[name] for name in fleet}


class Deployer:
    """One run of deploy.sh: the settings checked, then each step printed and (unless
    ``--dry-run``) run."""

    def __init__(
        self,
        settings: Settings,
        options: Options,
        topics: Mapping[str, str | None],
        relays: Collection[str] = (),
    ) -> None:
        self.settings = settings
        self.options = options
        self.topics = topics
        self.relays = relays
        self.chosen = options.chosen or list(settings.fleet)
        self.per_instance = settings.number("CONCURRENCY") + settings.number("DB_MAX_OVERFLOW")
        self.budget = settings.number("DB_MAX_CONNECTIONS") - settings.number(
            "DB_RESERVED_CONNECTIONS"
        )
        slots = max(self.budget, 0) // self.per_instance
        self.max_instances = share(
            settings.fleet, topics, slots, settings.number("EVENT_INSTANCES"), relays
        )
        self.min_instances = {
            name: 0 if topics.get(name) or name in relays else settings.number("MIN_INSTANCES")
            for name in settings.fleet
        }
        # A password in the deployer's shell must not reach gcloud or the functions by accident.
        self.environ = {k: v for k, v in os.environ.items() if k != "DB_PASS"}

    def run(self) -> None:
        self.show_budget()
        starved = [name for name, most in self.max_instances.items() if most < 1]
        if starved:
            raise Refused(
                f"the connection budget allows no instance for {' '.join(starved)}; raise"
                " DB_MAX_CONNECTIONS, lower CONCURRENCY, or deploy fewer functions (FUNCTIONS)"
            )
        too_warm = [
            f"{name} ({most})"
            for name, most in self.max_instances.items()
            if self.min_instances[name] > most
        ]
        if too_warm:
            raise Refused(
                f"MIN_INSTANCES={self.settings.get('MIN_INSTANCES')} is more than the budget"
                f" gives {', '.join(too_warm)}; lower it or raise DB_MAX_CONNECTIONS"
            )
        unwanted = self.check_deployed()
        if self.options.migrate:
            self.migrate()
        for name, region in unwanted:
            self.execute(self.delete_command(name, region))
        for name in self.chosen:
            self.execute(self.deploy_command(name))
            if name in self.relays:
                self.schedule(name)

    def schedule(self, name: str) -> None:
        """Let the scheduler's account invoke the relay, and create or update its job: a POST
        with an OIDC token for the function's URL, every minute (``RELAY_SCHEDULE``)."""
        s = self.settings
        where = [f"--project={s.get('PROJECT_ID')}"]
        account = s.get("SCHEDULER_SERVICE_ACCOUNT")
        self.execute(
            ["gcloud", "functions", "add-invoker-policy-binding", name,
             f"--region={s.get('REGION')}", *where, f"--member=serviceAccount:{account}"]
        )  # fmt: skip
        describe = ["gcloud", "functions", "describe", name, f"--region={s.get('REGION')}",
                    *where, "--format=value(url)"]  # fmt: skip
        show(describe)
        url = f"URL_OF_{name}" if self.options.dry_run else self.output_of(describe).strip()
        job = name.replace("_", "-")
        jobs = ["gcloud", "scheduler", "jobs", "list", f"--location={s.get('REGION')}", *where,
                "--format=value(name)"]  # fmt: skip
        show(jobs)
        existing = [] if self.options.dry_run else self.output_of(jobs).split()
        verb = "update" if any(path.rsplit("/", 1)[-1] == job for path in existing) else "create"
        self.execute(
            ["gcloud", "scheduler", "jobs", verb, "http", job, f"--location={s.get('REGION')}",
             *where, f"--schedule={s.get('RELAY_SCHEDULE')}", "--time-zone=Etc/UTC",
             f"--uri={url}", "--http-method=POST", f"--oidc-service-account-email={account}",
             f"--oidc-token-audience={url}", "--attempt-deadline=60s",
             "--max-retry-attempts=2", "--min-backoff=10s", "--max-backoff=20s"]
        )  # fmt: skip

    def show_budget(self) -> None:
        """Print the budget, what each function of the deployment may hold, and the total."""
        s = self.settings
        print(
            f"connection budget: {s.get('DB_MAX_CONNECTIONS')} max_connections -"
            f" {s.get('DB_RESERVED_CONNECTIONS')} reserved = {self.budget}; each instance holds"
            f" {self.per_instance} ({s.get('CONCURRENCY')} pool + {s.get('DB_MAX_OVERFLOW')}"
            " overflow)",
            flush=True,
        )
        width = max(len(name) for name in s.fleet)
        for name, most in self.max_instances.items():
            warm = self.min_instances[name]
            note = "" if name in self.chosen else "  (in FUNCTIONS, not deployed now)"
            kept = f", {warm} kept warm" if warm else ""
            print(
                f"  {name:<{width}}  --max-instances={most} x {self.per_instance} ="
                f" {most * self.per_instance} connections{kept}{note}"
            )
        total = sum(self.max_instances.values()) * self.per_instance
        print(f"  {'total':<{width}}  {total} of {self.budget} connections", flush=True)

    def execute(self, command: Sequence[str], **env: str) -> None:
        """Print the command and, unless it is a dry run, run it, its output shown."""
        show(command)
        if not self.options.dry_run:
            self._run(command, env, capture=False)

    def output_of(self, command: Sequence[str]) -> str:
        """Run a command already shown, and keep its output from the terminal."""
        return self._run(command, {}, capture=True)

    def _run(self, command: Sequence[str], env: Mapping[str, str], *, capture: bool) -> str:
        # As under the shell's `set -e`: a failing command ends the deploy with its status.
        completed = subprocess.run(  # noqa: S603  # gcloud and this Python, arguments built here
            list(command), env={**self.environ, **env}, check=False, text=True,
            stdout=subprocess.PIPE if capture else None,
        )  # fmt: skip
        if completed.returncode != 0:
            raise SystemExit(completed.returncode)
        return completed.stdout or ""

    def check_deployed(self) -> list[tuple[str, str]]:
        """Functions deployed earlier keep their --max-instances until redeployed: count what
        those already on this database (the same INSTANCE_CONNECTION_NAME, or the same
        DATABASE_URL secret) may hold, beside what this deploy gives. With ``--prune``, those
        outside FUNCTIONS are not counted but returned (name, region), to be deleted."""
        s = self.settings
        if s.mode == "url":
            secret = s.get("DATABASE_URL_SECRET").split(":")[0]
            database, shared_by = f"the database of secret {secret}", f"secret:{secret}"
        else:
            database = s.get("INSTANCE_CONNECTION_NAME")
            shared_by = f"instance:{database}"
        listing = ["gcloud", "functions", "list", f"--project={s.get('PROJECT_ID')}",
                   "--format=json"]  # fmt: skip
        show(listing)
        if self.options.dry_run:
            print(
                f"skipped in a dry run: reading which functions are already deployed on"
                f" {database}; a real run counts them against the budget"
                + (", and --prune deletes those not in FUNCTIONS" if self.options.prune else ""),
                flush=True,
            )
            return []
        held = 0
        holders: list[str] = []
        redeploy: list[str] = []  # in the deployment, but deployed with another share
        unwanted: list[tuple[str, str]] = []
        for name, region, most, each in holdings(json.loads(self.output_of(listing)), shared_by):
            if region == s.get("REGION") and name in self.chosen:
                continue  # replaced by this deploy
            if self.options.prune and name not in s.fleet:
                unwanted.append((name, region))
                continue
            held += most * each
            holders.append(f"{name} in {region} ({most} instances x {each})")
            if name in s.fleet:
                redeploy.append(name)
        planned = sum(self.max_instances[name] for name in self.chosen) * self.per_instance
        if held + planned > self.budget:
            remedies = []
            if redeploy:
                remedies.append(
                    f"deploy them with their new share: ./deploy.sh {' '.join(self.chosen)}"
                    f" {' '.join(name for name in redeploy if name not in self.chosen)}"
                )
            if len(redeploy) < len(holders):
                remedies.append(
                    "delete the functions not in FUNCTIONS"
                    f" ({' '.join(s.fleet)}) as this deploy runs: add --prune"
                )
            raise Refused(
                f"functions already deployed on {database} may hold {held} connections:",
                *(f"  {holder}" for holder in holders),
                f"with the {planned} of this deploy that passes the budget of {self.budget};",
                *remedies,
            )
        return unwanted

    def delete_command(self, name: str, region: str) -> list[str]:
        s = self.settings
        return ["gcloud", "functions", "delete", name, f"--region={region}",
                f"--project={s.get('PROJECT_ID')}", "--quiet"]  # fmt: skip

    def fetch_secret(self, secret: str) -> list[str]:
        """The gcloud command that prints a secret's value."""
        name, version = secret_ref(secret).split(":", 1)
        return ["gcloud", "secrets", "versions", "access", version, f"--secret={name}",
                f"--project={self.settings.get('PROJECT_ID')}"]  # fmt: skip

    def migrate(self) -> None:
        """``python -m db upgrade`` as the schema's owner; the secret it needs is fetched and
        handed to it alone, never printed."""
        s = self.settings
        upgrade = [sys.executable, "-m", "db", "upgrade"]
        env: dict[str, str] = {}
        if s.mode == "url":
            print("migrating the schema as its owner, at the DATABASE_URL kept in Secret Manager")
            fetch = self.fetch_secret(s.get("MIGRATION_DATABASE_URL_SECRET"))
            show(fetch)
            if not self.options.dry_run:
                env["DATABASE_URL"] = self.output_of(fetch).rstrip("\n")
        else:
            print(
                f"migrating the schema as its owner {s.get('DB_OWNER')}, through the Cloud SQL"
                " connector"
            )
            env = {
                "INSTANCE_CONNECTION_NAME": s.get("INSTANCE_CONNECTION_NAME"),
                "DB_USER": s.get("DB_OWNER"),
                "DB_NAME": s.get("DB_NAME"),
                "DB_IP_TYPE": s.get("DB_IP_TYPE"),
                "DB_IAM_AUTH": s.get("DB_OWNER_IAM_AUTH"),
            }
            if s.get("DB_OWNER_IAM_AUTH") == "false":
                fetch = self.fetch_secret(s.get("DB_OWNER_PASS_SECRET"))
                show(fetch)
                if not self.options.dry_run:
                    env["DB_PASS"] = self.output_of(fetch).rstrip("\n")
        self.execute(upgrade, **env)

    def env_vars(self) -> str:
        s = self.settings
        pool = s.get("CONCURRENCY")
        shared = (
            f"DB_POOL_SIZE={pool},DB_MAX_OVERFLOW={s.get('DB_MAX_OVERFLOW')},THREADS={pool}"
            f",LOG_LEVEL={s.get('LOG_LEVEL')},GOOGLE_CLOUD_PROJECT={s.get('PROJECT_ID')}"
        )
        if s.mode == "url":
            return shared
        connector = (
            f"INSTANCE_CONNECTION_NAME={s.get('INSTANCE_CONNECTION_NAME')}"
            f",DB_USER={s.get('DB_USER')},DB_NAME={s.get('DB_NAME')}"
            f",DB_IP_TYPE={s.get('DB_IP_TYPE')},DB_IAM_AUTH={s.get('DB_IAM_AUTH')},"
        )
        password = f",DB_PASS_FILE={PASSWORD_FILE}" if s.get("DB_IAM_AUTH") == "false" else ""
        return connector + shared + password

    def deploy_command(self, name: str) -> list[str]:
        s = self.settings
        command = [
            *("gcloud", "functions", "deploy", name, "--gen2"),
            f"--project={s.get('PROJECT_ID')}",
            f"--region={s.get('REGION')}",
            f"--runtime={s.get('RUNTIME')}",
            "--source=.",
            f"--entry-point={name}",
        ]
        topic = self.topics.get(name)
        if topic:
            # Without --retry a failed delivery is dropped; with it, redelivered for up to 24 h.
            command += [
                f"--trigger-topic={topic}",
                "--retry",
                f"--trigger-service-account={s.get('TRIGGER_SERVICE_ACCOUNT')}",
            ]
        elif name in self.relays:  # only the scheduler's account may call it
            command += ["--trigger-http", "--no-allow-unauthenticated"]
        else:
            command += ["--trigger-http", self.options.access]
        command += [
            f"--service-account={s.get('SERVICE_ACCOUNT')}",
            f"--set-env-vars={self.env_vars()}",
            f"--concurrency={s.get('CONCURRENCY')}",
            f"--cpu={s.get('CPU')}",
            f"--memory={s.get('MEMORY')}",
            f"--timeout={s.get('TIMEOUT')}",
            f"--max-instances={self.max_instances[name]}",
            "--quiet",
        ]
        # Each deploy states every setting, so one that was dropped is removed, not left behind.
        if s.mode == "url":
            secret = secret_ref(s.get("DATABASE_URL_SECRET"))
            command.append(f"--set-secrets=DATABASE_URL={secret}")
        elif s.get("DB_IAM_AUTH") == "false":
            # A file, read again at each access: a rotated password needs no redeploy.
            secret = secret_ref(s.get("DB_PASS_SECRET"))
            command.append(f"--set-secrets={PASSWORD_FILE}={secret}")
        else:
            command.append("--clear-secrets")
        connector = s.get("VPC_CONNECTOR")
        command.append(f"--vpc-connector={connector}" if connector else "--clear-vpc-connector")
        build = s.get("BUILD_SERVICE_ACCOUNT")
        command.append(
            f"--build-service-account=projects/{s.get('PROJECT_ID')}/serviceAccounts/{build}"
            if build
            else "--clear-build-service-account"
        )
        warm = self.min_instances[name]
        command.append(f"--min-instances={warm}" if warm else "--clear-min-instances")
        return command


def holdings(deployed: list[dict[str, object]], shared_by: str) -> list[tuple[str, str, int, int]]:
    """Each function of ``deployed`` (``gcloud functions list``) on the same database:
    its name, region, most instances and connections each."""
    found = []
    for function in deployed:
        config: dict[str, object] = function.get("serviceConfig", {})  # type: ignore[assignment]
        env: dict[str, str] = config.get("environmentVariables", {})  # type: ignore[assignment]
        secrets = {
            item.get("key"): item.get("secret")
            for item in config.get("secretEnvironmentVariables", [])  # type: ignore[attr-defined]
        }
        if shared_by not in (
            f"instance:{env.get('INSTANCE_CONNECTION_NAME')}",
            f"secret:{secrets.get('DATABASE_URL')}",
        ):
            continue
        pool = int(env.get("DB_POOL_SIZE") or config.get("maxInstanceRequestConcurrency") or 1)  # type: ignore[call-overload]
        each = pool + int(env.get("DB_MAX_OVERFLOW") or 0)
        region, name = str(function["name"]).split("/")[3::2]
        found.append((name, region, int(config.get("maxInstanceCount", 100)), each))  # type: ignore[call-overload]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """deploy.sh's logic; the exit status (2 for a problem with the settings or arguments)."""
    try:
        found = entry_points(ROOT / "main.py")
        names = [entry.name for entry in found]
        options = parse_arguments(sys.argv[1:] if argv is None else argv, names)
        settings = Settings(os.environ, found, options)
        if settings.problems:
            raise Refused(*settings.problems)
        if not options.dry_run and shutil.which("gcloud") is None:
            raise Refused("gcloud is not on PATH; install the Google Cloud CLI")
        topics = {entry.name: entry.topic for entry in found}
        relays = {entry.name for entry in found if entry.relay}
        Deployer(settings, options, topics, relays).run()
    except Refused as refused:
        for problem in refused.problems:
            print(f"deploy.sh: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
