"""The study storage is opened before any training: bad URLs, drivers and servers in one line."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import optuna
import pytest

from canao.cli import main
from canao.nas.search import run_search
from canao.nas.storage import StorageError, normalize_url, open_storage, redact
from tests.postgres import PostgresServer
from tests.search_fakes import SPACE, FakeEvaluator
from tests.test_search import settings


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again when the probe goes


def test_unreachable_server_is_one_line_without_the_password() -> None:
    url = f"postgresql+psycopg://canao:s3cret@127.0.0.1:{_closed_port()}/study"
    started = time.monotonic()
    with pytest.raises(StorageError) as raised:
        open_storage(url)
    message = str(raised.value)
    assert message.startswith("cannot open study storage postgresql+psycopg://canao:***@")
    assert "s3cret" not in message and "\n" not in message
    assert "refused" in message or "connect" in message
    assert time.monotonic() - started < 30  # bounded: connect_timeout, not the OS's minutes


def test_missing_driver_names_the_extra_that_installs_it() -> None:
    with pytest.raises(StorageError, match=r"pip install 'canao\[postgres\]'"):
        open_storage("postgresql+pg8000://canao@127.0.0.1/study")  # pg8000 is not installed


def test_not_a_database_url() -> None:
    with pytest.raises(StorageError, match="not a database URL"):
        open_storage("studies/search.db")


def test_sqlite_in_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        open_storage(f"sqlite:///{tmp_path / 'nowhere' / 'study.db'}")


def test_plain_postgresql_url_uses_the_installed_driver() -> None:
    # psycopg 3 is what canao[postgres] installs; SQLAlchemy's plain scheme means psycopg2.
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"


def test_search_checks_the_storage_before_training(tmp_path: Path, capsys) -> None:
    # Were the storage opened after the teacher, this would fine-tune for minutes first.
    started = time.monotonic()
    code = main(
        ["search", "--storage", "postgresql+pg8000://x@127.0.0.1/db", "-o", str(tmp_path / "s")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("canao: error: study storage") and "Traceback" not in err
    assert "canao[postgres]" in err
    assert time.monotonic() - started < 60
    assert not (tmp_path / "s").exists()  # nothing trained, nothing written


def test_a_real_postgresql_study_resumes(postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    plain = url.replace("postgresql+psycopg://", "postgresql://")  # what a user types
    first = run_search(SPACE, FakeEvaluator(), settings(trials=5), plain)
    assert len(first.trials) == 5
    again = run_search(SPACE, FakeEvaluator(), settings(trials=8), plain)
    states = {t.state for t in again.trials}
    assert len(again.trials) == 8 and states == {optuna.trial.TrialState.COMPLETE}


def test_budget_minutes_stops_the_trial_loop(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    slow = FakeEvaluator(delay_s=0.5)
    started = time.monotonic()
    study = run_search(SPACE, slow, settings(trials=1000, budget_minutes=0.02), storage)
    elapsed = time.monotonic() - started
    # 1.2 s of budget, 0.5 s a trial: a few trials, and the one started in time finishes.
    assert 1 <= len(study.trials) <= 5
    assert elapsed < 1.2 + 2.0
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
