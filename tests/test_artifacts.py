"""The study's teacher and super-network, shared through an artifact store (nas/artifacts.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from canao.nas.artifacts import ArtifactError, StudyArtifacts, open_artifact_store, study_lock
from tests.postgres import PostgresServer


def _study(storage: str, name: str = "shared") -> optuna.Study:
    return optuna.create_study(storage=storage, study_name=name, load_if_exists=True)


def _builder(folder: Path, calls: list[str]):
    def build() -> Path:
        calls.append(str(folder))
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"hidden_size": 8}')
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
        return folder

    return build


def test_a_second_machine_downloads_what_the_first_built(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    store = open_artifact_store(str(tmp_path / "store"))
    calls: list[str] = []
    # Two machines: one study database and one store, each its own cache folder.
    first = tmp_path / "machine-a" / "teachers" / "sst2-0123"
    second = tmp_path / "machine-b" / "teachers" / "sst2-0123"
    built = StudyArtifacts(_study(storage), store, storage).folder(
        "teacher", first, _builder(first, calls)
    )
    assert built == first and calls == [str(first)]
    joined = StudyArtifacts(_study(storage), store, storage).folder(
        "teacher", second, _builder(second, calls)
    )
    assert joined == second and calls == [str(first)]  # downloaded, not trained again
    for name in ("config.json", "model.safetensors"):
        assert (second / name).read_bytes() == (first / name).read_bytes()
    # And a third call on machine B finds its own copy without touching the store.
    assert StudyArtifacts(_study(storage), None, storage).folder("teacher", second, None) == second  # type: ignore[arg-type]


def test_a_worker_with_other_settings_is_refused(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    store = open_artifact_store(str(tmp_path / "store"))
    folder = tmp_path / "a" / "supernets" / "sst2-aaaa"
    StudyArtifacts(_study(storage), store, storage).folder("supernet", folder, _builder(folder, []))
    other = tmp_path / "b" / "supernets" / "sst2-bbbb"
    with pytest.raises(ArtifactError, match=r"was built with supernet sst2-aaaa.*sst2-bbbb"):
        StudyArtifacts(_study(storage), store, storage).folder(
            "supernet", other, _builder(other, [])
        )


def test_bad_artifact_stores_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="unknown artifact store 'ftp://x'"):
        open_artifact_store("ftp://x")
    with pytest.raises(ArtifactError, match="does not exist"):
        open_artifact_store(str(tmp_path / "missing" / "store"))


def test_an_unreadable_artifact_names_it(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    store = open_artifact_store(str(tmp_path / "store"))
    first = tmp_path / "a" / "teachers" / "t-1"
    StudyArtifacts(_study(storage), store, storage).folder("teacher", first, _builder(first, []))
    for path in (tmp_path / "store").iterdir():
        path.unlink()  # the store lost it
    second = tmp_path / "b" / "teachers" / "t-1"
    with pytest.raises(ArtifactError, match=r"cannot read artifact .* for t-1"):
        StudyArtifacts(_study(storage), store, storage).folder(
            "teacher", second, _builder(second, [])
        )
    assert not second.exists()  # nothing half-written for the next run to trust


# A worker on its own "machine" (cache folder): fetch or build the teacher, noting a build.
WORKER = """
import sys, time
from pathlib import Path
import optuna
from canao.nas.artifacts import StudyArtifacts, open_artifact_store

storage, store, folder, log = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
study = optuna.create_study(storage=storage, study_name="shared", load_if_exists=True)

def build():
    with log.open("a") as f:
        f.write(f"{folder}\\n")
    time.sleep(2)  # long enough for the other worker to reach the lock
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder

StudyArtifacts(study, open_artifact_store(store), storage).folder("teacher", folder, build)
print((folder / "config.json").is_file())
"""


def test_workers_on_two_machines_train_one_teacher_over_postgresql(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    url = postgres_server.new_database()
    optuna.create_study(storage=url, study_name="shared")  # the schema, created once
    store, log = tmp_path / "store", tmp_path / "builds.log"
    store.mkdir()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(store), str(tmp_path / m / "t-1"), str(log)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for m in ("machine-a", "machine-b")
    ]
    outputs = [worker.communicate(timeout=120)[0].strip() for worker in workers]
    assert [w.returncode for w in workers] == [0, 0] and outputs == ["True", "True"]
    assert len(log.read_text().splitlines()) == 1  # one trained, the other downloaded
    attrs = optuna.load_study(study_name="shared", storage=url).user_attrs
    assert json.dumps(attrs["canao:artifact:teacher"]["key"]) == '"t-1"'


def test_the_database_lock_excludes_across_connections(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    url = postgres_server.new_database()
    script = (
        "import sys, time\n"
        "from canao.nas.artifacts import study_lock\n"
        "with study_lock(sys.argv[1], 'x'):\n"
        "    print('held', flush=True); time.sleep(3)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, url], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    import time

    started = time.monotonic()
    with study_lock(url, "x"):
        waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert waited > 1.0  # it waited for the other process to let go
    with study_lock(url, "another"):  # other names are other locks
        pass


@pytest.mark.slow
def test_a_search_worker_that_joins_never_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `canao search` runs, two cache folders (two machines), one study and one store:
    the second fetches teacher and super-network; training there would raise."""
    from canao.cli import main
    from canao.nas import distill, finetune

    store, db = tmp_path / "store", tmp_path / "study.db"
    common = [
        "search", "--teacher-examples", "64", "--supernet-steps", "2", "--dev-limit", "40",
        "--seq", "32", "--retrain-steps", "0", "--no-export", "--storage", f"sqlite:///{db}",
        "--artifacts", str(store),
    ]  # fmt: skip
    monkeypatch.setenv("CANAO_CACHE_DIR", str(tmp_path / "machine-a"))
    assert main([*common, "--trials", "2", "-o", str(tmp_path / "a")]) == 0

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a joining worker trained")

    monkeypatch.setattr(finetune, "_finetune_into", no_training)
    monkeypatch.setattr(distill, "_train_supernet_into", no_training)
    monkeypatch.setenv("CANAO_CACHE_DIR", str(tmp_path / "machine-b"))
    assert main([*common, "--trials", "4", "-o", str(tmp_path / "b")]) == 0
    assert list((tmp_path / "machine-b" / "teachers").glob("*/config.json"))
    assert list((tmp_path / "machine-b" / "supernets").glob("*/supernet.json"))
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["trials"] == {"COMPLETE": 4}  # the study went on from the first worker's 2


def test_an_s3_store_round_trips_through_the_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3://bucket/prefix, against moto's in-process S3 (the same boto3 calls as a real one)."""
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    with moto.mock_aws():
        boto3.client("s3").create_bucket(Bucket="canao-bucket")
        storage = f"sqlite:///{tmp_path / 'study.db'}"
        store = open_artifact_store("s3://canao-bucket/team/sst2")
        first, second = (tmp_path / m / "supernets" / "s-1" for m in ("a", "b"))
        calls: list[str] = []
        StudyArtifacts(_study(storage), store, storage).folder(
            "supernet", first, _builder(first, calls)
        )
        StudyArtifacts(_study(storage), store, storage).folder(
            "supernet", second, _builder(second, calls)
        )
        assert calls == [str(first)]
        assert (second / "model.safetensors").read_bytes() == (
            first / "model.safetensors"
        ).read_bytes()
        keys = [
            o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="canao-bucket")["Contents"]
        ]
        assert len(keys) == 1 and keys[0].startswith("team/sst2/")


def test_s3_without_boto3_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    with pytest.raises(ArtifactError, match=r"pip install 'canao\[s3\]'"):
        open_artifact_store("s3://bucket/prefix")
