"""One configuration for every command and service: command line, then environment, then a file.

Every setting has one environment variable (the names the deploy env file, the systemd units
and ``phasestream up``'s ``RUN_DIR/phasestream.env`` use). A command takes, for each setting, its
command-line option when given, else the variable from the environment, else the value in the
configuration file (``--config FILE`` or ``$PHASESTREAM_CONFIG``: an env file such as
``deploy/env/phasestream.env``, or a TOML file such as ``phasestream.toml`` whose keys are the
settings' names or their variables), else the default. ``phasestream config`` prints the result
with where each value came from, secrets masked; :func:`problems` says what is wrong with it.

Typing and parsing are pydantic's (:class:`Settings`), env files python-dotenv's, TOML the
standard library's; this module decides the sources' order itself, so that it can say where each
value came from, and adds the checks that need no network (``phasestream deploy check`` adds
those that do, :mod:`phasestream.app.deploycheck`).
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from phasestream.modelserver.protocol import DEFAULT_MODEL_ADDRESS
from phasestream.transport.wire import DEFAULT_IN_ADDRESS, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_OUT_ADDRESS

__all__ = ["CONFIG_ENV", "LOG_LEVELS", "PLACEHOLDER", "Loaded", "Problem", "Settings", "describe", "export",
           "load_settings", "mask", "mask_secrets", "problems", "variable"]

CONFIG_ENV = "PHASESTREAM_CONFIG"
# read where the kernels and the reference loader run (Dask workers too): the same names as
# phasestream.kernels.backend.ENV_VAR and phasestream.references.spectra.REFERENCE_FOLDERS_ENV
# (tests/test_settings.py checks), not imported so that `phasestream proxy` starts without NumPy's kernels
BACKEND_ENV = "PHASESTREAM_BACKEND"
#: the kernel backends a setting may name: kernels.backend.BACKENDS and auto (not imported: it loads numba)
SETTINGS_BACKENDS = ("auto", "numpy", "numba", "cupy")
REFERENCE_FOLDERS_ENV = "PHASESTREAM_REFERENCES"
PLACEHOLDER = "CHANGEME"  # a value containing it (or CHANGE-ME) was never filled in (deploy/env/phasestream.env)
_PLACEHOLDER = re.compile(r"change-?me", re.IGNORECASE)
API_KEY_PATTERN = re.compile(r"[A-Za-z0-9]+")  # what Tiled accepts as a single-user API key
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # and the other standard names (WARN, NOTSET ...)
# in text: a URI (scheme://, up to a blank or a quote), else a name=value pair (a query parameter, a libpq
# key/value string); a value whose name says it is secret is masked
_URI_OR_PAIR = re.compile(r"(?P<uri>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+)"
                          r"|(?P<name>[\w.%-]+)=(?P<value>[^\s&;'\"<>#]*)")
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|api_?key|credential|signature", re.IGNORECASE)


def _var(name: str, field_name: str):
    """The variable ``name`` or, in a TOML file, the setting's own name."""
    return AliasChoices(name, field_name)


class Settings(BaseModel):
    """Every setting of phasestream; the variable of each is its alias (``TILED_URI``, ``PHASESTREAM_*``).

    Build it with :func:`load_settings` (the sources in order); ``Settings()`` is the defaults.
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    tiled_uri: str | None = Field(None, validation_alias=_var("TILED_URI", "tiled_uri"),
                                  description="the Tiled server every command and service uses")
    tiled_api_key: SecretStr | None = Field(None, validation_alias=_var("TILED_API_KEY", "tiled_api_key"),
                                            description="Tiled's single API key (letters and digits)")
    tiled_host: str = Field("127.0.0.1", validation_alias=_var("PHASESTREAM_TILED_HOST", "tiled_host"),
                            description="address the Tiled server binds")
    tiled_port: int = Field(8000, ge=1, le=65535, validation_alias=_var("PHASESTREAM_TILED_PORT", "tiled_port"),
                            description="port the Tiled server binds")
    db_user: str | None = Field(None, validation_alias=_var("PGUSER", "db_user"),
                                description="PostgreSQL role of Tiled's catalog and tables (libpq's variable)")
    db_password: SecretStr | None = Field(None, validation_alias=_var("PGPASSWORD", "db_password"),
                                          description="its password, written once: the URIs carry none")
    tiled_catalog: str | None = Field(None, validation_alias=_var("PHASESTREAM_TILED_CATALOG", "tiled_catalog"),
                                      description="Tiled's catalog database (deploy/tiled/config.yml)")
    tiled_tables: str | None = Field(None, validation_alias=_var("PHASESTREAM_TILED_TABLES", "tiled_tables"),
                                     description="Tiled's event-table database")
    tiled_data: str | None = Field(None, validation_alias=_var("PHASESTREAM_TILED_DATA", "tiled_data"),
                                   description="folder Tiled writes arrays to")
    detector_files: str | None = Field(None, validation_alias=_var("PHASESTREAM_DETECTOR_FILES", "detector_files"),
                                       description="folder of detector files Tiled and serve (--asset-dir) read")
    redis: str | None = Field(None, validation_alias=_var("PHASESTREAM_REDIS", "redis"),
                              description="Redis of Tiled's streaming cache")
    od_store: str | None = Field(None, validation_alias=_var("PHASESTREAM_OD_STORE", "od_store"),
                                 description="folder the worker writes the live OD cube to (serve --od-store)")
    zmq_in: str = Field(DEFAULT_IN_ADDRESS, validation_alias=_var("PHASESTREAM_ZMQ_IN", "zmq_in"),
                        description="0MQ proxy: publishers connect here (deployment files; proxy --in)")
    zmq_out: str = Field(DEFAULT_OUT_ADDRESS, validation_alias=_var("PHASESTREAM_ZMQ_OUT", "zmq_out"),
                         description="0MQ proxy: workers subscribe here (serve --zmq; deployment files)")
    model_server: str = Field(DEFAULT_MODEL_ADDRESS, validation_alias=_var("PHASESTREAM_MODEL_SERVER",
                                                                           "model_server"),
                              description="model server address (serve, reprocess --models)")
    models: str | None = Field(None, validation_alias=_var("PHASESTREAM_MODELS", "models"),
                               description="folders of model artifacts besides the packaged ones (os.pathsep)")
    dask_scheduler: str | None = Field(None, validation_alias=_var("PHASESTREAM_DASK_SCHEDULER", "dask_scheduler"),
                                       description="Dask scheduler of the post-scan jobs")
    dask_workers: int = Field(2, ge=1, le=1024, validation_alias=_var("PHASESTREAM_DASK_WORKERS", "dask_workers"),
                              description="Dask worker processes (deployment files; up --dask-workers)")
    dask_http: str = Field("127.0.0.1:8787", validation_alias=_var("PHASESTREAM_DASK_HTTP", "dask_http"),
                           description="the Dask scheduler's HTTP server (health, metrics)")
    host: str = Field("127.0.0.1", validation_alias=_var("PHASESTREAM_HOST", "host"),
                      description="address the Dask workers and the live view bind (deployment files)")
    view_port: int = Field(8010, ge=1, le=65535, validation_alias=_var("PHASESTREAM_VIEW_PORT", "view_port"),
                           description="port of the live view (deployment files; view --port)")
    references: str | None = Field(None, validation_alias=_var(REFERENCE_FOLDERS_ENV, "references"),
                                   description="folders whose reference files a start document may name")
    backend: str = Field("auto", validation_alias=_var(BACKEND_ENV, "backend"),
                         description="kernel backend: auto, numpy, numba or cupy")
    max_message_size: int = Field(DEFAULT_MAX_MESSAGE_SIZE, validation_alias=_var("PHASESTREAM_MAX_MESSAGE_SIZE",
                                                                                  "max_message_size"),
                                  description="largest 0MQ document a worker accepts (bytes; 64MB, 1GiB)")
    log_level: str | None = Field(None, validation_alias=_var("PHASESTREAM_LOG_LEVEL", "log_level"),
                                  description="log level of the services (-v wins): DEBUG, INFO, WARNING, ...")

    @field_validator("dask_workers", "tiled_port", "view_port", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # TOML true would be 1 worker, port 1
            raise ValueError(f"an integer, got {value!r}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_name(cls, value: Any) -> str | None:
        if value is None:
            return None
        name = str(value).strip().upper()
        if name not in logging.getLevelNamesMapping():  # the proxy failed with "Unknown level", naming no variable
            raise ValueError(f"a log level ({', '.join(LOG_LEVELS)}), got {value!r}")
        return name

    @field_validator("max_message_size", mode="before")
    @classmethod
    def _byte_size(cls, value: Any) -> int:
        from phasestream.transport.wire import parse_byte_size

        return parse_byte_size(value)

    # --- derived values -------------------------------------------------------------------

    @property
    def api_key(self) -> str | None:
        return self.tiled_api_key.get_secret_value() if self.tiled_api_key else None

    @property
    def reference_folders(self) -> list[str]:
        return [p for p in (self.references or "").split(os.pathsep) if p]

    @property
    def model_folders(self) -> list[str]:
        return [p for p in (self.models or "").split(os.pathsep) if p]

    @property
    def scheduler(self) -> str | None:
        """The Dask scheduler; None for unset, empty or ``none``."""
        return None if (self.dask_scheduler or "").lower() in ("", "none") else self.dask_scheduler


SECRETS = frozenset({"tiled_api_key", "db_password"})


def variable(name: str) -> str:
    """The environment variable of setting ``name``."""
    return Settings.model_fields[name].validation_alias.choices[0]


def _read_file(path: Path) -> dict[str, Any]:
    """The values of a configuration file: TOML (``.toml``) or an env file (``KEY=VALUE`` lines)."""
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} does not exist ({CONFIG_ENV} or --config)")
    if path.suffix == ".toml":
        with path.open("rb") as f:
            data = tomllib.load(f)
        return data.get("phasestream", data)  # a [phasestream] table, or keys at the top
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


@dataclass(frozen=True)
class Loaded:
    """Settings and where each value came from."""

    settings: Settings
    sources: dict[str, str]  # setting -> "command line", "environment (NAME)", "FILE", "default"
    config_file: Path | None


def load_settings(config_file: str | os.PathLike | None = None, *, cli: dict[str, Any] | None = None,
                  environ: dict[str, str] | None = None) -> Loaded:
    """The settings from ``cli`` (given options only), the environment and ``config_file``
    (default ``$PHASESTREAM_CONFIG``; none when unset). Raises ``ValueError`` naming the setting,
    its source and what is wrong when a value does not parse."""
    environ = dict(os.environ if environ is None else environ)
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    path = config_file or environ.get(CONFIG_ENV) or None
    path = Path(path).expanduser() if path else None
    from_file = _read_file(path) if path else {}
    sources: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        var = variable(name)
        if name in cli:
            values[name], sources[name] = cli[name], "command line"
        elif var in environ:
            values[name], sources[name] = environ[var], f"environment ({var})"
        elif var in from_file or name in from_file:
            values[name], sources[name] = from_file.get(var, from_file.get(name)), str(path)
        else:
            sources[name] = "default"
    try:
        settings = Settings(**values)
    except ValidationError as exc:  # one line per bad value, naming its variable and source
        lines = [f"{variable(str(e['loc'][0]))} ({sources.get(str(e['loc'][0]), '?')}): {e['msg']}"
                 for e in exc.errors()]
        raise ValueError("invalid configuration: " + "; ".join(lines)) from None
    return Loaded(settings, sources, path)


def export(loaded: Loaded, environ: dict[str, str] | None = None) -> None:
    """Put the values that came from the configuration file into ``environ`` (default ``os.environ``)
    under their variables, so that what reads the environment (Tiled clients, Dask workers and other
    child processes, the model registry) sees the same configuration. Variables already set stay."""
    environ = os.environ if environ is None else environ
    for name, source in loaded.sources.items():
        if loaded.config_file is not None and source == str(loaded.config_file):
            value = getattr(loaded.settings, name)
            environ.setdefault(variable(name), value.get_secret_value() if isinstance(value, SecretStr) else str(value))


def mask(name: str, value: Any) -> str:
    """``value`` for people: secrets as ``***`` (with a placeholder said so), else :func:`mask_secrets`."""
    if value is None:
        return ""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    text = str(value)
    if name in SECRETS:
        return "*** (placeholder)" if _PLACEHOLDER.search(text) else "***"
    return mask_secrets(text)


def mask_secrets(text: str) -> str:
    """``text`` fit for people and logs: the password of every URI in it and the value of every
    password-, key- or token-like ``name=value`` pair (``?password=``, ``api_key=``, ``access_token=``;
    libpq's ``password=``) as ``***``.

    A URI's password is its userinfo after the first ``:``, the userinfo being the network location up
    to its **last** ``@`` (``redis://:p@ss@host`` has the password ``p@ss``). What ``phasestream config``,
    ``deploy check`` and the Tiled log filter of ``phasestream up`` print goes through here.
    """
    return _URI_OR_PAIR.sub(_mask_match, text)


def _mask_match(match: re.Match) -> str:
    if match["uri"] is not None:
        return _mask_uri(match["uri"])
    name, value = match["name"], match["value"]
    if value and _SECRET_NAME.search(unquote(name)):
        return f"{name}=***"
    return f"{name}={mask_secrets(value)}" if "://" in value else match.group()  # url=postgresql://u:pw@h


def _mask_uri(uri: str) -> str:
    scheme, _, rest = uri.partition("://")
    try:
        netloc = urlsplit(uri).netloc  # rest up to the first / ? or #
    except ValueError:  # an unbalanced [ of an IPv6 host: the same split by hand
        netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    tail = _URI_OR_PAIR.sub(_mask_match, rest[len(netloc):])  # the query's and the fragment's pairs
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    return f"{scheme}://{netloc}{tail}"


@dataclass(frozen=True)
class Problem:
    """Something wrong with a setting: ``level`` "error" (a service would fail) or "warning"."""

    setting: str
    level: str
    message: str


def problems(settings: Settings) -> list[Problem]:
    """What is wrong with ``settings`` without asking the network: placeholders, key format, addresses."""
    found: list[Problem] = []
    key = settings.api_key
    if key is None:
        found.append(Problem("tiled_api_key", "warning", "TILED_API_KEY is not set: Tiled servers that want a key "
                                                         "refuse every request"))
    elif _PLACEHOLDER.search(key):
        found.append(Problem("tiled_api_key", "error", "TILED_API_KEY is still the placeholder: set it to "
                                                       "`openssl rand -hex 32`"))
    elif not API_KEY_PATTERN.fullmatch(key):
        found.append(Problem("tiled_api_key", "error", "TILED_API_KEY must be ASCII letters and digits only "
                                                       "(Tiled refuses to start with it)"))
    for name in Settings.model_fields:
        value = getattr(settings, name)
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if name != "tiled_api_key" and isinstance(text, str) and _PLACEHOLDER.search(text):
            found.append(Problem(name, "error", f"{variable(name)} still holds the placeholder {PLACEHOLDER}"))
    if settings.tiled_uri and not re.match(r"https?://[^/\s]+", settings.tiled_uri):
        found.append(Problem("tiled_uri", "error", f"TILED_URI must be http(s)://HOST[:PORT]/api/v1, got "
                                                   f"{mask('tiled_uri', settings.tiled_uri)!r}"))
    if settings.tiled_uri and "api_key=" in settings.tiled_uri:
        found.append(Problem("tiled_uri", "warning", "TILED_URI carries an api_key: it may reach logs; use "
                                                     "TILED_API_KEY"))
    for name in ("zmq_in", "zmq_out", "model_server", "dask_scheduler"):
        value = getattr(settings, name)
        if value and value.lower() not in ("none", "local") and not re.fullmatch(r"(tcp://)?[^:/\s]+:\d+", value):
            found.append(Problem(name, "error", f"{variable(name)} must be tcp://HOST:PORT, got {value!r}"))
    if settings.backend.lower() not in SETTINGS_BACKENDS:
        found.append(Problem("backend", "error", f"{BACKEND_ENV} must be one of {', '.join(SETTINGS_BACKENDS)}"))
    return found


def describe(loaded: Loaded) -> list[dict[str, str]]:
    """One row per setting: name, variable, value (masked), source."""
    s = loaded.settings
    return [{"setting": name, "variable": variable(name), "value": mask(name, getattr(s, name)),
             "source": loaded.sources[name]} for name in Settings.model_fields]
