"""Postgres connections carry the configured timeouts and keepalives."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from stowaway.db.engine import PostgresTimeouts, make_claim_engine, make_engine
from stowaway.settings import OPTIONS_BY_NAME, load_settings

pytestmark = pytest.mark.postgres
postgres_only = pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)

TIMEOUTS = PostgresTimeouts(
    connect=3, statement=1.5, keepalives_idle=7, keepalives_interval=4, keepalives_count=5
)


def connect_params(engine: Engine) -> dict[str, str]:
    """The libpq parameters a connection of ``engine`` was opened with."""
    with engine.connect() as conn:
        params: dict[str, str] = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
    return params


@postgres_only
def test_the_engine_and_its_claim_pool_carry_the_timeouts(db_url: str) -> None:
    engine = make_engine(db_url, TIMEOUTS)
    claim = make_claim_engine(engine)
    assert claim is not None
    try:
        for pool in (engine, claim):
            params = connect_params(pool)
            assert params["connect_timeout"] == "3"
            assert params["keepalives"] == "1"
            assert params["keepalives_idle"] == "7"
            assert params["keepalives_interval"] == "4"
            assert params["keepalives_count"] == "5"
            assert params["tcp_user_timeout"] == "20000"
            with pool.connect() as conn:
                assert conn.execute(text("SHOW statement_timeout")).scalar() == "1500ms"
        with claim.connect() as conn:
            assert conn.execute(text("SHOW synchronous_commit")).scalar() == "off"
    finally:
        claim.dispose()
        engine.dispose()


@postgres_only
def test_a_parameter_in_the_url_wins(db_url: str) -> None:
    url = make_url(db_url).update_query_dict({"connect_timeout": "5"})
    engine = make_engine(url.render_as_string(hide_password=False), TIMEOUTS)
    try:
        assert connect_params(engine)["connect_timeout"] == "5"
    finally:
        engine.dispose()


@postgres_only
def test_a_statement_past_the_timeout_is_cancelled(db_url: str) -> None:
    engine = make_engine(db_url, PostgresTimeouts(statement=0.5))
    try:
        with pytest.raises(Exception, match="statement timeout"), engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(5)"))
    finally:
        engine.dispose()


def test_the_settings_build_the_timeouts() -> None:
    import argparse

    names = (
        "db_connect_timeout",
        "db_statement_timeout",
        "db_keepalives_idle",
        "db_keepalives_interval",
        "db_keepalives_count",
    )
    args = argparse.Namespace(**{name: None for name in names})
    environ = {
        OPTIONS_BY_NAME[name].env: value
        for name, value in zip(names, ("3s", "1500ms", "7", "4s", "5"), strict=True)
    }
    assert load_settings(args, environ).postgres_timeouts == TIMEOUTS
    assert load_settings(args, {}).postgres_timeouts == PostgresTimeouts()
    assert PostgresTimeouts().answer_deadline == 32.0
    assert PostgresTimeouts(statement=0).answer_deadline is None
