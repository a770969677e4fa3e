"""One teacher and one super-network per study, shared by every worker on every machine.

Workers on one machine already share them through the local cache (content-keyed folders
written under a file lock). Workers on several machines share only the study's database, so
``--artifacts`` names a store they can all reach: a folder (NFS, a mounted bucket) or
``s3://bucket/prefix`` (any S3-compatible service; ``AWS_ENDPOINT_URL`` for MinIO and
friends), through Optuna's artifact stores. The study records, per kind, the cache key of
what it was built with and the artifact that holds it:

- a worker that finds the record downloads the artifact into its own cache (once) and never
  trains;
- the first worker takes a lock held by the study's database itself (a PostgreSQL or MySQL
  advisory lock, so it holds across machines; a file lock beside a SQLite file), builds it
  (or finds it in its cache), uploads it and records it; the others wait on the lock, then
  download;
- a worker whose settings give another key (another teacher, other data or super-network
  settings) is refused with one line instead of scoring candidates with another
  super-network inside the same study.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna

from canao.errors import CanaoError
from canao.locks import file_lock, staged_folder

ATTR_PREFIX = "canao:artifact:"  # study user attribute per kind: {"key", "artifact_id"}
LOCK_WAIT_S = 4 * 3600  # a worker waits this long for another to finish training


class ArtifactError(CanaoError):
    """An artifact store that cannot be used, or a study built with other artifacts."""


def open_artifact_store(url: str) -> Any:
    """An Optuna artifact store for ``url``: a folder, or ``s3://bucket[/prefix]``."""
    from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore

    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        try:
            import boto3
        except ImportError:
            raise ArtifactError(
                f"artifact store {url} needs boto3, which is not installed: pip install 'canao[s3]'"
            ) from None
        store = Boto3ArtifactStore(bucket, client=boto3.client("s3"))
        return _Prefixed(store, prefix) if prefix else store
    if "://" in url:
        raise ArtifactError(f"unknown artifact store {url!r}: give a folder or s3://bucket/prefix")
    folder = Path(url).expanduser()
    if not folder.parent.is_dir():
        raise ArtifactError(f"artifact store {url}: folder {folder.parent} does not exist")
    folder.mkdir(exist_ok=True)
    return FileSystemArtifactStore(str(folder))


class _Prefixed:
    """An artifact store whose ids live under a key prefix (one bucket, several projects)."""

    def __init__(self, store: Any, prefix: str) -> None:
        self.store, self.prefix = store, prefix.strip("/") + "/"

    def open_reader(self, artifact_id: str) -> Any:
        return self.store.open_reader(self.prefix + artifact_id)

    def write(self, artifact_id: str, content_body: Any) -> None:
        self.store.write(self.prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.store.remove(self.prefix + artifact_id)


class StudyArtifacts:
    """The teacher and super-network folders of one study, fetched or built once."""

    def __init__(self, study: optuna.Study, store: Any, storage_url: str) -> None:
        self.study, self.store, self.storage_url = study, store, storage_url

    def folder(self, kind: str, local: Path, build: Callable[[], Path]) -> Path:
        """``local`` (a content-keyed cache folder) with what the study recorded for ``kind``.

        Downloaded when the study has it; else built by ``build`` (which may find it in the
        local cache), uploaded and recorded, under the study's lock.
        """
        recorded = self._recorded(kind, local)
        if recorded is not None:
            return self._fetch(recorded, local)
        with study_lock(self.storage_url, f"{self.study.study_name}:{kind}"):
            recorded = self._recorded(kind, local)  # built by the worker we waited for?
            if recorded is not None:
                return self._fetch(recorded, local)
            built = build()
            if built.name != local.name:
                raise ArtifactError(f"{kind}: built {built} is not the expected {local.name}")
            artifact_id = _upload(self.study, self.store, built)
            self.study.set_user_attr(
                ATTR_PREFIX + kind, {"key": local.name, "artifact_id": artifact_id}
            )
            return built

    def _recorded(self, kind: str, local: Path) -> str | None:
        """The recorded artifact id for ``kind``; an error when it was built with another key."""
        attrs = self.study._storage.get_study_user_attrs(self.study._study_id)
        record = attrs.get(ATTR_PREFIX + kind)
        if record is None:
            return None
        if record["key"] != local.name:
            raise ArtifactError(
                f"study {self.study.study_name!r} was built with {kind} {record['key']}, this "
                f"worker's settings give {local.name}: run it with the same teacher, data and "
                "super-network settings, or name another study"
            )
        return str(record["artifact_id"])

    def _fetch(self, artifact_id: str, local: Path) -> Path:
        if (local / "config.json").is_file():
            return local  # already here (this machine built it, or fetched it before)
        local.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(local.with_name(local.name + ".lock")):
            if not (local / "config.json").is_file():
                _download(self.store, artifact_id, local)
        return local


def _upload(study: optuna.Study, store: Any, folder: Path) -> str:
    from optuna.artifacts import upload_artifact

    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / f"{folder.name}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(folder.iterdir()):
                tar.add(path, arcname=path.name)
        return upload_artifact(
            artifact_store=store,
            file_path=str(archive),
            study_or_trial=study,
            mimetype="application/gzip",
        )


def _download(store: Any, artifact_id: str, local: Path) -> None:
    """Unpack the artifact into ``local``: whole, or not at all (a staged folder)."""
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / "artifact.tar.gz"
        try:
            with store.open_reader(artifact_id) as reader, archive.open("wb") as out:
                shutil.copyfileobj(reader, out)
        except Exception as error:
            raise ArtifactError(
                f"cannot read artifact {artifact_id} for {local.name} from the study's "
                f"artifact store: {error}"
            ) from None
        with staged_folder(local) as staging, tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")


def _lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for ``name`` (PostgreSQL's bigint)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def study_lock(storage_url: str, name: str) -> Iterator[None]:
    """A lock every worker of the study sees: the database's own where it has one.

    PostgreSQL: a session advisory lock; MySQL: ``GET_LOCK``; both hold across machines and
    are released by the server if the holder dies. SQLite (one machine): a file lock beside
    the database file.
    """
    from canao.nas.storage import _engine_kwargs, normalize_url

    url = normalize_url(storage_url)
    if url.startswith("sqlite:///"):
        database = Path(url.removeprefix("sqlite:///"))
        with file_lock(database.with_name(f"{database.name}.{_lock_key(name) & 0xFFFF:04x}.lock")):
            yield
        return
    import sqlalchemy

    if url.startswith("postgresql"):
        acquire, release = "SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"
        params: dict[str, object] = {"key": _lock_key(name)}
    elif url.startswith("mysql"):
        acquire, release = "SELECT GET_LOCK(:key, :wait)", "SELECT RELEASE_LOCK(:key)"
        params = {"key": hashlib.sha256(name.encode()).hexdigest()[:60], "wait": LOCK_WAIT_S}
    else:
        raise ArtifactError(f"no cross-machine lock for storage {url.split(':', 1)[0]}")
    engine = sqlalchemy.create_engine(url, **_engine_kwargs(url))
    try:
        # Autocommit: the lock is the session's, and a training run of half an hour must not
        # hold a transaction open on the server.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(sqlalchemy.text(acquire), params)
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text(release), params)
    finally:
        engine.dispose()
