"""One configuration (phasestream.app.settings): command line, then environment, then a file;
`phasestream config` shows where each value came from with secrets masked, and `deploy check`
finds a placeholder key, a missing folder and a database that does not answer or refuses the password."""

from __future__ import annotations

import json
import secrets

import pytest
from services_support import postgres_bin, private_postgres, private_redis, redis_bin, refused_port

from phasestream.app.cli import main
from phasestream.app.deploycheck import deploy_check
from phasestream.app.settings import (
    BACKEND_ENV,
    REFERENCE_FOLDERS_ENV,
    Settings,
    describe,
    export,
    load_settings,
    problems,
    variable,
)
from phasestream.kernels.backend import ENV_VAR
from phasestream.references.spectra import REFERENCE_FOLDERS_ENV as LOADER_ENV

KEY = "k" + secrets.token_hex(16)
PASSWORD = "pw" + secrets.token_hex(8)


def _env_file(tmp_path, **values) -> str:
    path = tmp_path / "phasestream.env"
    path.write_text("# a deploy env file\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
    return str(path)


def test_command_line_wins_over_environment_which_wins_over_the_file(tmp_path):
    path = _env_file(tmp_path, TILED_URI="http://file:8000/api/v1", PHASESTREAM_MODEL_SERVER="tcp://file:5579",
                     PHASESTREAM_DASK_WORKERS="3", PHASESTREAM_MAX_MESSAGE_SIZE="64M")
    environ = {"TILED_URI": "http://env:8000/api/v1", "PHASESTREAM_MODEL_SERVER": "tcp://env:5579"}
    loaded = load_settings(path, cli={"tiled_uri": "http://cli:8000/api/v1", "zmq_out": None}, environ=environ)
    s = loaded.settings
    assert s.tiled_uri == "http://cli:8000/api/v1" and loaded.sources["tiled_uri"] == "command line"
    assert s.model_server == "tcp://env:5579"
    assert loaded.sources["model_server"] == "environment (PHASESTREAM_MODEL_SERVER)"
    assert s.dask_workers == 3 and loaded.sources["dask_workers"] == path
    assert s.max_message_size == 64 << 20
    assert s.zmq_out == Settings().zmq_out and loaded.sources["zmq_out"] == "default"  # None: not given


def test_toml_file_by_setting_names_and_the_file_of_phasestream_config(tmp_path):
    toml = tmp_path / "phasestream.toml"
    toml.write_text('[phasestream]\ntiled_uri = "http://toml:8000/api/v1"\nPHASESTREAM_DASK_SCHEDULER = "tcp://s:1"\n')
    loaded = load_settings(environ={"PHASESTREAM_CONFIG": str(toml)})
    assert loaded.settings.tiled_uri == "http://toml:8000/api/v1" and loaded.settings.scheduler == "tcp://s:1"
    assert loaded.config_file == toml
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(tmp_path / "missing.env", environ={})


def test_file_values_are_exported_to_what_reads_the_environment(tmp_path):
    path = _env_file(tmp_path, TILED_API_KEY=KEY, PHASESTREAM_BACKEND="numpy", TILED_URI="http://f:1/api/v1")
    environ = {"TILED_URI": "http://env:1/api/v1"}
    export(load_settings(path, environ=environ), environ)
    assert environ == {"TILED_URI": "http://env:1/api/v1", "TILED_API_KEY": KEY, "PHASESTREAM_BACKEND": "numpy"}


def test_variable_names_are_those_the_lower_layers_read():
    assert BACKEND_ENV == ENV_VAR and REFERENCE_FOLDERS_ENV == LOADER_ENV
    assert variable("backend") == ENV_VAR and variable("references") == LOADER_ENV


def test_a_bad_value_names_its_variable_and_source(tmp_path):
    with pytest.raises(ValueError, match=r"PHASESTREAM_TILED_PORT \(environment \(PHASESTREAM_TILED_PORT\)\)"):
        load_settings(environ={"PHASESTREAM_TILED_PORT": "eighty"})


def test_secrets_are_masked_and_the_placeholder_is_flagged(tmp_path):
    catalog = f"postgresql+asyncpg://tiled:{PASSWORD}@127.0.0.1:5432/tiled"
    loaded = load_settings(environ={"TILED_API_KEY": KEY, "PHASESTREAM_TILED_CATALOG": catalog})
    shown = json.dumps(describe(loaded))
    assert KEY not in shown and PASSWORD not in shown and "tiled:***@127.0.0.1" in shown
    assert problems(loaded.settings) == []

    placeholder = load_settings(environ={"TILED_API_KEY": "CHANGEME0000000000000000"})
    assert [(p.setting, p.level) for p in problems(placeholder.settings)] == [("tiled_api_key", "error")]
    assert "placeholder" in problems(placeholder.settings)[0].message
    assert {r["variable"]: r["value"] for r in describe(placeholder)}["TILED_API_KEY"] == "*** (placeholder)"
    bad = load_settings(environ={"TILED_API_KEY": "has-dash", "PHASESTREAM_ZMQ_OUT": "localhost"})
    assert {p.setting for p in problems(bad.settings)} == {"tiled_api_key", "zmq_out"}


def test_config_command_prints_sources_without_secrets(tmp_path, capsys, monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(variable(name), raising=False)
    path = _env_file(tmp_path, TILED_API_KEY=KEY, TILED_URI="http://127.0.0.1:9/api/v1",
                     PHASESTREAM_TILED_TABLES=f"postgresql://tiled:{PASSWORD}@db:5432/tiled")
    monkeypatch.setenv("PHASESTREAM_MODEL_SERVER", "tcp://gpu:5579")
    assert main(["--config", path, "config", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["variable"]: r for r in report["settings"]}
    assert rows["TILED_URI"]["source"] == path and rows["TILED_API_KEY"]["value"] == "***"
    assert rows["PHASESTREAM_MODEL_SERVER"]["source"] == "environment (PHASESTREAM_MODEL_SERVER)"
    assert rows["PHASESTREAM_ZMQ_OUT"]["source"] == "default"
    assert main(["--config", path, "config"]) == 0
    out = capsys.readouterr().out
    assert KEY not in out and PASSWORD not in out
    monkeypatch.setenv("TILED_API_KEY", "CHANGEME0000")
    assert main(["--config", path, "config"]) == 1
    assert "placeholder" in capsys.readouterr().out


def test_a_command_that_needs_tiled_says_when_none_is_configured(capsys, monkeypatch):
    monkeypatch.delenv("TILED_URI", raising=False)
    monkeypatch.delenv("PHASESTREAM_CONFIG", raising=False)
    assert main(["query", "--soc", "2.0"]) == 2
    err = capsys.readouterr().err
    assert "no Tiled server configured" in err and "--tiled URI" in err and "--catalog DIR" in err


def _deploy_settings(tmp_path, **extra) -> Settings:
    for name in ("data", "od"):
        (tmp_path / name).mkdir(exist_ok=True)
    environ = {"TILED_API_KEY": KEY, "PHASESTREAM_TILED_DATA": str(tmp_path / "data"),
               "PHASESTREAM_OD_STORE": str(tmp_path / "od"), **extra}
    return load_settings(environ=environ).settings


def _levels(checks) -> dict[str, str]:
    return {c.name: c.level for c in checks}


def test_deploy_check_finds_a_placeholder_key_and_a_missing_folder(tmp_path):
    assert "error" not in _levels(deploy_check(_deploy_settings(tmp_path))).values()
    checks = deploy_check(_deploy_settings(tmp_path, TILED_API_KEY="CHANGEME00",
                                           PHASESTREAM_MODELS=str(tmp_path / "no-models")))
    levels = _levels(checks)
    assert levels["setting tiled_api_key"] == "error" and levels["folder models"] == "error"
    assert "does not exist" in next(c.detail for c in checks if c.name == "folder models")
    assert levels["folder od_store"] == "ok"


def test_deploy_check_finds_a_database_that_does_not_answer(tmp_path, capsys, monkeypatch):
    with refused_port() as port:
        uri = f"postgresql+asyncpg://tiled:{PASSWORD}@127.0.0.1:{port}/tiled"
        checks = deploy_check(_deploy_settings(tmp_path, PHASESTREAM_TILED_CATALOG=uri,
                                               PHASESTREAM_REDIS=f"redis://127.0.0.1:{port}"))
        assert _levels(checks)["database tiled_catalog"] == "error" and _levels(checks)["redis"] == "error"
        assert all(PASSWORD not in c.detail for c in checks)
        monkeypatch.setenv("PHASESTREAM_TILED_CATALOG", uri)
        monkeypatch.setenv("TILED_API_KEY", KEY)
        assert main(["deploy", "check"]) == 1
    out = capsys.readouterr().out
    assert "database tiled_catalog" in out and PASSWORD not in out


@pytest.mark.skipif(postgres_bin() is None or redis_bin() is None, reason="PostgreSQL and Redis not installed "
                                                                         "(.ci/ensure-services.sh installs them)")
def test_deploy_check_against_real_postgres_and_redis(tmp_path):
    with private_postgres(password=PASSWORD) as pg, private_redis(tmp_path / "redis") as redis_uri:
        good = pg.replace("postgresql://", "postgresql+asyncpg://")
        levels = _levels(deploy_check(_deploy_settings(tmp_path, PHASESTREAM_TILED_CATALOG=good,
                                                       PHASESTREAM_TILED_TABLES=pg, PHASESTREAM_REDIS=redis_uri)))
        assert levels["database tiled_catalog"] == levels["database tiled_tables"] == levels["redis"] == "ok"
        # the password in one place, as deploy/env/phasestream.env writes it: PGUSER/PGPASSWORD, URIs without
        bare = "postgresql://" + pg.split("@", 1)[1]
        ok = _levels(deploy_check(_deploy_settings(tmp_path, PHASESTREAM_TILED_TABLES=bare, PGUSER="postgres",
                                                   PGPASSWORD=PASSWORD)))
        assert ok["database tiled_tables"] == "ok"
        checks = deploy_check(_deploy_settings(tmp_path, PHASESTREAM_TILED_TABLES=bare, PGUSER="postgres",
                                               PGPASSWORD="wrong" + PASSWORD))
        refused = next(c for c in checks if c.name == "database tiled_tables")
        assert refused.level == "error" and "password authentication failed" in refused.detail, refused
        assert all(PASSWORD not in c.detail for c in checks)


@pytest.mark.parametrize(("toml", "variable", "message"), [
    ("max_message_size = 1.5\n", "PHASESTREAM_MAX_MESSAGE_SIZE", "not a size in bytes: 1.5"),  # AttributeError before
    ("max_message_size = [1]\n", "PHASESTREAM_MAX_MESSAGE_SIZE", r"not a size in bytes: \[1\]"),
    ("max_message_size = true\n", "PHASESTREAM_MAX_MESSAGE_SIZE", "not a size in bytes: True"),  # was 1 byte
    ("max_message_size = '99999999999999999999G'\n", "PHASESTREAM_MAX_MESSAGE_SIZE", "at most 1 TiB"),
    ("dask_workers = true\n", "PHASESTREAM_DASK_WORKERS", "an integer, got True"),
    ("dask_workers = -3\n", "PHASESTREAM_DASK_WORKERS", "greater than or equal to 1"),
    ("tiled_port = 99999\n", "PHASESTREAM_TILED_PORT", "less than or equal to 65535"),
    ("view_port = 0\n", "PHASESTREAM_VIEW_PORT", "greater than or equal to 1"),
])
def test_a_configuration_value_of_the_wrong_type_or_range_names_its_variable(tmp_path, toml, variable, message):
    (tmp_path / "c.toml").write_text(toml)
    with pytest.raises(ValueError, match=rf"invalid configuration: {variable} \(.*c\.toml\): .*{message}"):
        load_settings(config_file=tmp_path / "c.toml", environ={})


@pytest.mark.parametrize("argv", [["serve", "--workers", "0"], ["reprocess", "--workers", "-1", "x"],
                                  ["up", "--dask-workers", "0"]])
def test_worker_counts_below_one_are_refused_by_the_command_line(argv, capsys):
    """``--workers -1`` made a Dask cluster of no worker, on which a submitted job never ran."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "1e12", "lots"])
def test_a_model_server_request_limit_that_is_not_a_finite_positive_size_is_refused(value, capsys):
    """``--max-request-mb nan`` (or ``inf``) ended ``serve-models`` with a traceback from ``int()``."""
    with pytest.raises(SystemExit) as exit_:
        main(["serve-models", "--max-request-mb", value])
    assert exit_.value.code == 2 and "--max-request-mb: expected a number of MB" in capsys.readouterr().err


@pytest.mark.parametrize(("variable", "uri", "shown"), [
    ("PHASESTREAM_TILED_TABLES", f"postgresql://tiled@db:5432/tiled?password={PASSWORD}&sslmode=require",
     "postgresql://tiled@db:5432/tiled?password=***&sslmode=require"),  # libpq reads ?password=
    ("PHASESTREAM_REDIS", f"redis://:Red@{PASSWORD}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),  # redis-py
    ("PHASESTREAM_TILED_CATALOG", f"postgresql+asyncpg://tiled:p@ss@{PASSWORD}@db/tiled?sslpassword={PASSWORD}",
     "postgresql+asyncpg://tiled:***@db/tiled?sslpassword=***"),
    ("TILED_URI", f"http://127.0.0.1:8000/api/v1?api_key={PASSWORD}", "http://127.0.0.1:8000/api/v1?api_key=***"),
], ids=["tables-query", "redis-at-sign", "catalog-at-sign", "tiled-api-key"])  # ids without the random password
def test_uri_passwords_in_a_query_or_holding_an_at_sign_are_masked_as_in_tiled_logs(variable, uri, shown, capsys,
                                                                                      monkeypatch):
    from phasestream.app.stack import RedactSecrets

    rows = {r["variable"]: r["value"] for r in describe(load_settings(environ={variable: uri}))}
    assert rows[variable] == shown
    assert RedactSecrets.redact(f"connecting to {uri} (refused)") == f"connecting to {shown} (refused)"
    monkeypatch.setenv(variable, uri)
    main(["config"])
    assert PASSWORD not in capsys.readouterr().out


def test_the_log_level_is_a_standard_level_name_refused_naming_its_variable(capsys, monkeypatch):
    assert load_settings(environ={"PHASESTREAM_LOG_LEVEL": "warning"}).settings.log_level == "WARNING"
    assert load_settings(environ={}).settings.log_level is None
    with pytest.raises(ValueError, match=r"PHASESTREAM_LOG_LEVEL \(environment.*DEBUG, INFO, WARNING.*got 'loud'"):
        load_settings(environ={"PHASESTREAM_LOG_LEVEL": "loud"})
    monkeypatch.setenv("PHASESTREAM_LOG_LEVEL", "LOUD")
    assert main(["config"]) == 2
    assert "PHASESTREAM_LOG_LEVEL" in capsys.readouterr().err
