"""A local Elasticsearch cluster for development and tests, bound to 127.0.0.1.

The distribution is the ``integ-test-zip`` artifact from Maven Central, fetched
with ``mvn``, checked against a pinned SHA-512 and unpacked
once into a cache directory. Each node gets its own config, data and log
directories under ``<ESFM_HOME>/clusters/<name>/``, and the cluster is
described by ``state.json`` next to them. When called as root, the nodes run
as an unprivileged system account, because Elasticsearch refuses to run as
root.

Layout, with ``ESFM_HOME`` defaulting to ``~/.cache/esfm`` (``/var/lib/esfm``
for root, because other accounts cannot enter ``/root``)::

    <ESFM_HOME>/dist/elasticsearch-<version>/   unpacked distribution (cache)
    <ESFM_HOME>/clusters/<name>.lock            present while a command changes <name>
    <ESFM_HOME>/clusters/<name>/state.json      pids, ports and paths
    <ESFM_HOME>/clusters/<name>/elastic-password  secured clusters only (mode 600)
    <ESFM_HOME>/clusters/<name>/certs/          CA and node certificate (secured)
    <ESFM_HOME>/clusters/<name>/node-<i>/{config,data,logs,tmp}

``ESFM_CACHE_DIR`` moves the distribution cache elsewhere, so tests can keep
cluster state in a temporary home and still share one download.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from esfm.errors import LocalClusterError

logger = logging.getLogger(__name__)

DEFAULT_VERSION = "9.5.0"
# SHA-512 of org.elasticsearch.distribution.integ-test-zip:elasticsearch:<v>:zip,
# computed from the artifact that mvn fetched from Maven Central.
PINNED_SHA512 = {
    "9.5.0": (
        "c06bd4ef7691da91052cada7bb255b2d7c48a1422820a8db0e3e3a1ed0dde4e8"
        "d380cdbadeb7029cc56167b9ad3a6d89f6b8edbc48d4b8685d1ab24a7ab17dd5"
    ),
}
MAVEN_GROUP = "org.elasticsearch.distribution.integ-test-zip"
MAVEN_ARTIFACT = "elasticsearch"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.11.0"

DEFAULT_HTTP_PORT = 9200
TRANSPORT_PORT_OFFSET = 100
DEFAULT_HEAP = "1g"
DEFAULT_MULTI_NODE_HEAP = "512m"
LOOPBACK = "127.0.0.1"
SERVICE_USER = "esfm"
STATE_FORMAT = 1
SUPERUSER = "elastic"
PASSWORD_FILE = "elastic-password"
LOG_TAIL_LINES = 40

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEAP_PATTERN = re.compile(r"^[1-9][0-9]*[mMgG]$")
_VERSION_PATTERN = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")

# Launched node processes, kept so that this process can reap them once they
# exit and so that Popen does not warn about children still running.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    """One progress update from a long cluster operation.

    ``stage`` is ``download``, ``verify``, ``unpack``, ``launch``, ``wait`` or
    ``stop``. ``completed`` and ``total`` count bytes for ``download``, files
    for ``unpack`` and nodes for ``wait``; ``total`` is None when unknown.
    """

    stage: str
    message: str
    completed: int | None = None
    total: int | None = None


ProgressCallback = Callable[[ProgressEvent], None]


def _notify(on_progress: ProgressCallback | None, stage: str, message: str, **counts):
    if on_progress is not None:
        on_progress(ProgressEvent(stage, message, **counts))


# --------------------------------------------------------------------------
# Paths


def default_home(environ: dict[str, str] | None = None) -> Path:
    """Return ``$ESFM_HOME``, else ``~/.cache/esfm`` (``/var/lib/esfm`` as root)."""
    env = os.environ if environ is None else environ
    if env.get("ESFM_HOME"):
        return Path(env["ESFM_HOME"]).expanduser()
    if os.geteuid() == 0:
        return Path("/var/lib/esfm")
    return Path("~/.cache/esfm").expanduser()


def default_cache_dir(environ: dict[str, str] | None = None) -> Path:
    """Return ``$ESFM_CACHE_DIR``, else ``<ESFM_HOME>/dist``."""
    env = os.environ if environ is None else environ
    if env.get("ESFM_CACHE_DIR"):
        return Path(env["ESFM_CACHE_DIR"]).expanduser()
    return default_home(env) / "dist"


def cluster_dir(name: str, home: Path | None = None) -> Path:
    """Return the directory that contains the state and nodes of cluster ``name``."""
    _validate_name(name)
    return (home or default_home()) / "clusters" / name


def state_path(name: str, home: Path | None = None) -> Path:
    """Return the path of the state file of cluster ``name``."""
    return cluster_dir(name, home) / "state.json"


@contextlib.contextmanager
def _cluster_lock(name: str, home: Path | None) -> Iterator[None]:
    # The lock file sits beside the cluster directory so that wipe can remove
    # the directory while holding the lock.
    lock_path = cluster_dir(name, home).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock_file = _acquire_lock_file(lock_path)
    try:
        yield
    finally:
        # Deleting the file while holding the lock is safe, because a process
        # that waits on the deleted file detects that and locks a new one.
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        fcntl.flock(lock_file, fcntl.LOCK_UN)
        lock_file.close()


def _acquire_lock_file(lock_path: Path):
    """Open ``lock_path`` and take an exclusive flock on it; return the open file.

    Another process may delete the file between this open and the flock, so
    the lock counts only when the path still names the locked inode.
    Otherwise this opens the path again.
    """
    while True:
        lock_file = open(lock_path, "a")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            locked = os.fstat(lock_file.fileno())
            current = os.stat(lock_path)
        except FileNotFoundError:
            lock_file.close()
            continue
        except BaseException:
            lock_file.close()
            raise
        if (locked.st_dev, locked.st_ino) == (current.st_dev, current.st_ino):
            return lock_file
        lock_file.close()


# --------------------------------------------------------------------------
# Java


@dataclasses.dataclass(frozen=True)
class JavaRuntime:
    """A Java installation found on this machine."""

    home: Path
    version: str
    major: int
    source: str


def required_java_major(version: str) -> int:
    """Return the lowest Java feature version that Elasticsearch ``version`` needs.

    Elasticsearch 9.x needs Java 21 and 8.x needs Java 17 (support matrix of
    the Elasticsearch reference for those releases).
    """
    major = int(version.split(".", 1)[0])
    return 21 if major >= 9 else 17


def read_java_release(home: Path) -> str | None:
    """Return ``JAVA_VERSION`` from ``<home>/release``, or None when absent."""
    try:
        text = (home / "release").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r'^JAVA_VERSION="?([^"\n]+)"?', text, re.MULTILINE)
    return match.group(1).strip() if match else None


def _java_major(version: str) -> int | None:
    # "1.8.0_392" is Java 8; "17.0.15" and "25" are feature versions.
    parts = re.findall(r"[0-9]+", version)
    if not parts:
        return None
    if parts[0] == "1" and len(parts) > 1:
        return int(parts[1])
    return int(parts[0])


def _java_candidates(
    environ: dict[str, str], search_dirs: list[Path]
) -> list[tuple[Path, str]]:
    candidates: list[tuple[Path, str]] = []
    for variable in ("ES_JAVA_HOME", "JAVA_HOME"):
        if environ.get(variable):
            candidates.append((Path(environ[variable]), variable))
    for directory in search_dirs:
        if directory.is_dir():
            for home in sorted(directory.iterdir()):
                candidates.append((home, str(directory)))
    return candidates


def find_java(
    version: str = DEFAULT_VERSION,
    *,
    environ: dict[str, str] | None = None,
    search_dirs: list[Path] | None = None,
) -> JavaRuntime:
    """Find a Java runtime new enough for Elasticsearch ``version``.

    ``ES_JAVA_HOME`` is used when it is set, and is an error when too old,
    because Elasticsearch itself would use it. Otherwise the newest suitable
    runtime among ``JAVA_HOME`` and the directories in ``search_dirs``
    (default ``/usr/lib/jvm``) wins. Versions come from each ``release`` file.

    Raises:
        LocalClusterError: no suitable runtime; the message lists what was found.
    """
    env = os.environ if environ is None else environ
    dirs = [Path("/usr/lib/jvm")] if search_dirs is None else search_dirs
    needed = required_java_major(version)
    found: list[JavaRuntime] = []
    seen: set[Path] = set()

    for home, source in _java_candidates(env, dirs):
        resolved = home.resolve()
        java_version = read_java_release(resolved)
        major = _java_major(java_version) if java_version else None
        if resolved in seen or major is None:
            continue
        if not os.access(resolved / "bin" / "java", os.X_OK):
            continue
        seen.add(resolved)
        runtime = JavaRuntime(resolved, java_version or "", major, source)
        if source == "ES_JAVA_HOME" and major < needed:
            raise LocalClusterError(
                f"ES_JAVA_HOME={home} is Java {java_version}, but Elasticsearch "
                f"{version} needs Java {needed} or newer",
                hint=f"point ES_JAVA_HOME at Java {needed}+ or unset it",
            )
        if source == "ES_JAVA_HOME":
            return runtime
        found.append(runtime)

    suitable = [runtime for runtime in found if runtime.major >= needed]
    if suitable:
        return max(suitable, key=lambda runtime: runtime.major)
    described = ", ".join(f"{r.home} (Java {r.version})" for r in found) or "none"
    raise LocalClusterError(
        f"no Java {needed}+ runtime found for Elasticsearch {version}; "
        f"searched ES_JAVA_HOME, JAVA_HOME and {', '.join(map(str, dirs))}; "
        f"found: {described}",
        hint=f"install Java {needed} or newer (for example "
        f"apt-get install openjdk-{needed}-jre-headless) or set ES_JAVA_HOME",
    )


# --------------------------------------------------------------------------
# Distribution


@dataclasses.dataclass(frozen=True)
class Distribution:
    """An unpacked, verified Elasticsearch distribution in the cache."""

    version: str
    home: Path
    sha512: str
    check: str


def _sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_checksum_file(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return text.split()[0].lower() if text else None


def verify_zip(zip_path: Path, version: str, *, sibling_dirs: list[Path]) -> str:
    """Check ``zip_path`` and return a sentence that names the check that passed.

    A pinned version is checked against its pinned SHA-512. Any other version
    is checked against a ``.sha512`` or ``.sha1`` file with the zip's name in
    one of ``sibling_dirs``.

    Raises:
        LocalClusterError: the checksum differs, or no checksum is available
            for a zip that did not come through mvn.
    """
    actual = _sha512(zip_path)
    pinned = PINNED_SHA512.get(version)
    if pinned is not None:
        if actual != pinned:
            raise LocalClusterError(
                f"SHA-512 of {zip_path} is {actual}, but the pinned SHA-512 of "
                f"Elasticsearch {version} is {pinned}",
                hint="delete the file and fetch it again",
            )
        return f"SHA-512 matches the value pinned for {version}"

    file_name = f"elasticsearch-{version}.zip"
    for directory in sibling_dirs:
        for suffix, compute in ((".sha512", lambda: actual), (".sha1", None)):
            expected = _read_checksum_file(directory / (file_name + suffix))
            if expected is None:
                continue
            computed = compute() if compute else _sha1(zip_path)
            if computed != expected:
                raise LocalClusterError(
                    f"{suffix[1:].upper()} of {zip_path} is {computed}, but "
                    f"{directory / (file_name + suffix)} says {expected}",
                    hint="delete the file and fetch it again",
                )
            return f"{suffix[1:].upper()} matches {directory / (file_name + suffix)}"
    raise LocalClusterError(
        f"no checksum to verify {zip_path} against: {version} has no pinned "
        f"SHA-512 and there is no {file_name}.sha512 or .sha1 beside it",
        hint=f"put the artifact's checksum in {zip_path}.sha512, or use "
        f"version {DEFAULT_VERSION}",
    )


def _zip_version(zip_path: Path) -> str:
    try:
        with zipfile.ZipFile(zip_path) as archive:
            first = archive.namelist()[0]
    except (OSError, zipfile.BadZipFile, IndexError) as exc:
        raise LocalClusterError(
            f"{zip_path} is not a readable zip file: {exc}",
            hint="pass an Elasticsearch integ-test-zip distribution",
        ) from exc
    match = re.match(r"^elasticsearch-([0-9]+\.[0-9]+\.[0-9]+)/", first)
    if not match:
        raise LocalClusterError(
            f"{zip_path} does not contain an elasticsearch-<version>/ directory "
            f"(first entry: {first!r})",
            hint="pass an Elasticsearch integ-test-zip distribution",
        )
    return match.group(1)


def _maven_repository() -> Path:
    return Path(os.environ.get("ESFM_MAVEN_REPO", "~/.m2/repository")).expanduser()


def _maven_artifact_dir(version: str) -> Path:
    return (
        _maven_repository().joinpath(*MAVEN_GROUP.split(".")) / MAVEN_ARTIFACT / version
    )


def maven_command(mvn: str, version: str, target_dir: Path) -> list[str]:
    """Return the mvn command line that copies the zip of ``version`` there.

    A pinned version is checked against its SHA-512 after the download, so
    mvn may accept it without the registry's checksum files, which some
    mirrors do not serve. Any other version needs them (strict checksums).
    """
    checksums = "--lax-checksums" if version in PINNED_SHA512 else "--strict-checksums"
    return [
        mvn,
        "--batch-mode",
        checksums,
        f"{DEPENDENCY_PLUGIN}:copy",
        f"-Dartifact={MAVEN_GROUP}:{MAVEN_ARTIFACT}:{version}:zip",
        f"-DoutputDirectory={target_dir}",
        f"-Dmaven.repo.local={_maven_repository()}",
    ]


def _fetch_with_maven(
    version: str, target_dir: Path, on_progress: ProgressCallback | None
) -> Path:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalClusterError(
            f"mvn is not installed; it fetches Elasticsearch {version}",
            hint="apt-get install maven, or pass a local zip with --dist / "
            "ESFM_ES_DIST",
        )
    command = maven_command(mvn, version, target_dir)
    logger.info("fetching Elasticsearch %s with %s", version, " ".join(command))
    _notify(on_progress, "download", f"fetching Elasticsearch {version} with mvn")
    log_path = target_dir / "mvn.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, cwd=target_dir
        )
        artifact_dir = _maven_artifact_dir(version)
        while process.poll() is None:
            _notify(
                on_progress,
                "download",
                f"fetching Elasticsearch {version} with mvn",
                completed=_partial_download_size(artifact_dir, version),
            )
            time.sleep(0.5)
    zip_path = target_dir / f"{MAVEN_ARTIFACT}-{version}.zip"
    if process.returncode != 0 or not zip_path.is_file():
        tail = _tail(log_path, 20)
        raise LocalClusterError(
            f"mvn failed to fetch Elasticsearch {version} "
            f"(exit status {process.returncode}):\n{tail}",
            hint="check the version exists as "
            f"{MAVEN_GROUP}:{MAVEN_ARTIFACT}:{version}:zip and that mvn can "
            "reach Maven Central",
        )
    return zip_path


def _partial_download_size(artifact_dir: Path, version: str) -> int | None:
    # NOTE: mvn reports no progress in batch mode, so this reads the size of
    # the file that the Maven resolver is writing. Its temporary name differs
    # between resolver versions, so any file named after the artifact counts.
    prefix = f"{MAVEN_ARTIFACT}-{version}.zip"
    sizes = []
    with contextlib.suppress(OSError):
        for entry in artifact_dir.iterdir():
            if entry.name.startswith(prefix) or entry.suffix == ".tmp":
                sizes.append(entry.stat().st_size)
    return max(sizes) if sizes else None


def _unpack(
    zip_path: Path, version: str, target: Path, on_progress: ProgressCallback | None
) -> None:
    # Unpacks into a temporary directory beside the target, then renames it,
    # so a half-written distribution never appears under its final name.
    prefix = f"elasticsearch-{version}/"
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
            for number, member in enumerate(members, start=1):
                _extract_member(archive, member, prefix, staging)
                if number % 20 == 0 or number == len(members):
                    _notify(
                        on_progress,
                        "unpack",
                        f"unpacking Elasticsearch {version}",
                        completed=number,
                        total=len(members),
                    )
        unpacked = staging / prefix.rstrip("/")
        os.chmod(unpacked, 0o755)
        os.rename(unpacked, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_member(
    archive: zipfile.ZipFile, member: zipfile.ZipInfo, prefix: str, staging: Path
) -> None:
    name = member.filename
    if not name.startswith(prefix) or ".." in Path(name).parts or name.startswith("/"):
        raise LocalClusterError(
            f"unexpected entry {name!r} in the distribution zip",
            hint="pass an Elasticsearch integ-test-zip distribution",
        )
    destination = staging / name
    if member.is_dir():
        destination.mkdir(parents=True, exist_ok=True)
        os.chmod(destination, 0o755)
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(member) as source, open(destination, "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 20)
    # Keep the execute bits from the zip (bin/ scripts, the native launcher)
    # and make everything readable by the account that runs the nodes.
    zip_mode = (member.external_attr >> 16) & 0o777
    os.chmod(destination, 0o755 if zip_mode & 0o111 else 0o644)


def _read_marker(dist_home: Path) -> dict[str, Any] | None:
    try:
        return json.loads((dist_home / ".esfm-distribution.json").read_text())
    except (OSError, ValueError):
        return None


def ensure_distribution(
    version: str | None = None,
    *,
    cache_dir: Path | None = None,
    dist_zip: str | os.PathLike[str] | None = None,
    on_progress: ProgressCallback | None = None,
) -> Path:
    """Return the home directory of a verified, unpacked distribution.

    Fetches the zip with mvn unless it is cached, or takes ``dist_zip``
    (default ``$ESFM_ES_DIST``) instead. Either way the zip is checked by
    :func:`verify_zip` before it is unpacked into ``cache_dir`` (default
    :func:`default_cache_dir`). The check that passed is logged, reported
    through ``on_progress`` and stored in ``.esfm-distribution.json``.

    Args:
        version: Elasticsearch version; defaults to the version inside
            ``dist_zip``, else :data:`DEFAULT_VERSION`.

    Raises:
        LocalClusterError: mvn is missing or failed, the zip is invalid, or
            its checksum does not match.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    zip_source = dist_zip or os.environ.get("ESFM_ES_DIST") or None
    local_zip = Path(zip_source).expanduser() if zip_source else None
    if local_zip is not None:
        zip_version = _zip_version(local_zip)
        if version is not None and version != zip_version:
            raise LocalClusterError(
                f"{local_zip} contains Elasticsearch {zip_version}, not {version}",
                hint=f"pass --version {zip_version} or another zip",
            )
        version = zip_version
    version = version or DEFAULT_VERSION
    _validate_version(version)

    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"elasticsearch-{version}"
    with open(cache / ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        marker = _read_marker(target)
        if marker is not None and local_zip is None:
            logger.debug("using cached Elasticsearch %s at %s", version, target)
            return target
        if target.exists() and marker is None:
            logger.warning("removing incomplete distribution %s", target)
            shutil.rmtree(target)

        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache) as scratch:
            if local_zip is not None:
                zip_path, sibling_dirs = local_zip, [local_zip.parent]
            else:
                zip_path = _fetch_with_maven(version, Path(scratch), on_progress)
                sibling_dirs = [_maven_artifact_dir(version)]
            _notify(on_progress, "verify", f"verifying {zip_path.name}")
            check = verify_zip(zip_path, version, sibling_dirs=sibling_dirs)
            sha512 = _sha512(zip_path)
            logger.info("verified Elasticsearch %s: %s", version, check)
            _notify(on_progress, "verify", check)

            if marker is not None:
                if marker.get("sha512") != sha512:
                    raise LocalClusterError(
                        f"the cache {target} contains a different build of "
                        f"Elasticsearch {version} than {zip_path}",
                        hint=f"remove {target} to replace it",
                    )
                return target
            _unpack(zip_path, version, target, on_progress)

        info = {"version": version, "sha512": sha512, "check": check}
        if local_zip is not None:
            info["source"] = str(local_zip)
        (target / ".esfm-distribution.json").write_text(json.dumps(info, indent=2))
    return target


# --------------------------------------------------------------------------
# State


@dataclasses.dataclass
class NodeState:
    """One node of a local cluster as recorded in the state file.

    ``pid`` is the Elasticsearch server JVM, ``launcher_pid`` the launcher
    JVM that started it; both are None for a node stopped by
    :func:`stop_node`. The ``*_start_ticks`` values are process start times
    from ``/proc/<pid>/stat``, which tell a reused pid from the node.
    """

    index: int
    name: str
    http_port: int
    transport_port: int
    url: str
    config_path: str
    data_path: str
    log_path: str
    pid: int | None = None
    pid_start_ticks: int | None = None
    launcher_pid: int | None = None
    launcher_start_ticks: int | None = None
    started_at: str | None = None

    def is_running(self, es_home: str) -> bool:
        """Return whether the recorded server process is alive and is this node."""
        return _is_node_process(self.pid, self.pid_start_ticks, es_home)


@dataclasses.dataclass
class ClusterState:
    """A local cluster as recorded in ``<ESFM_HOME>/clusters/<name>/state.json``."""

    name: str
    version: str
    es_home: str
    java_home: str
    user: str | None
    security: bool
    started_at: str
    nodes: list[NodeState]
    path: Path | None = None
    # Secured clusters only. The state file names the password file but never
    # contains the password.
    ca_certs: str | None = None
    ssl_fingerprint: str | None = None
    password_file: str | None = None

    @property
    def url(self) -> str:
        """HTTP URL of the first running node, else of the first node."""
        for node in self.nodes:
            if node.is_running(self.es_home):
                return node.url
        return self.nodes[0].url

    def is_running(self) -> bool:
        """Return whether at least one node's Elasticsearch process is alive."""
        return any(node.is_running(self.es_home) for node in self.nodes)

    def credentials(self) -> tuple[str, str] | None:
        """Return ``("elastic", password)`` of a secured cluster, else None.

        Raises:
            LocalClusterError: the password file is missing or unreadable.
        """
        if not self.security or not self.password_file:
            return None
        return SUPERUSER, read_password_file(Path(self.password_file))

    def running_nodes(self) -> list[NodeState]:
        """Return the nodes whose Elasticsearch process is alive."""
        return [node for node in self.nodes if node.is_running(self.es_home)]

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON document stored in the state file."""
        document = dataclasses.asdict(self)
        document.pop("path")
        document["format"] = STATE_FORMAT
        return document

    @classmethod
    def from_dict(cls, document: dict[str, Any], path: Path | None = None):
        """Build a state from a state file document.

        Raises:
            LocalClusterError: the document misses fields or has a newer format.
        """
        try:
            if document.get("format") != STATE_FORMAT:
                raise ValueError(f"unsupported format {document.get('format')!r}")
            nodes = [NodeState(**node) for node in document["nodes"]]
            fields = {k: document[k] for k in _STATE_FIELDS}
            fields.update({k: document.get(k) for k in _OPTIONAL_STATE_FIELDS})
        except (KeyError, TypeError, ValueError) as exc:
            raise LocalClusterError(
                f"invalid cluster state file {path}: {exc}",
                hint="stop stray nodes by hand, then delete the file",
            ) from exc
        return cls(**fields, nodes=nodes, path=path)


_STATE_FIELDS = ("name", "version", "es_home", "java_home", "user", "security")
_STATE_FIELDS += ("started_at",)
_OPTIONAL_STATE_FIELDS = ("ca_certs", "ssl_fingerprint", "password_file")


def write_state(state: ClusterState, path: Path) -> None:
    """Write ``state`` to ``path`` atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".state-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as stream:
            json.dump(state.to_dict(), stream, indent=2)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    state.path = path


def read_state(name: str = "default", *, home: Path | None = None):
    """Return the recorded state of cluster ``name``, or None when there is none.

    The state may describe nodes that are no longer running; see
    :meth:`ClusterState.is_running`.

    Raises:
        LocalClusterError: the state file exists but is not valid.
    """
    path = state_path(name, home)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LocalClusterError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise LocalClusterError(
            f"invalid JSON in cluster state file {path}: {exc}",
            hint="stop stray nodes by hand, then delete the file",
        ) from exc
    if not isinstance(document, dict):
        raise LocalClusterError(f"invalid cluster state file {path}: not an object")
    return ClusterState.from_dict(document, path)


# --------------------------------------------------------------------------
# Processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    # Returns (state letter, start time in clock ticks) from /proc/<pid>/stat.
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]


def _is_node_process(pid: int | None, start_ticks: int | None, es_home: str) -> bool:
    # NOTE: relies on Linux /proc; other systems report every node as stopped.
    if pid is None:
        return False
    _reap(pid)
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    if start_ticks is not None and stat[1] != start_ticks:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    arguments = [part.decode(errors="replace") for part in cmdline]
    return any("org.elasticsearch" in part for part in arguments) and any(
        es_home in part for part in arguments
    )


def _process_gone(pid: int | None, start_ticks: int | None) -> bool:
    if pid is None:
        return True
    _reap(pid)
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return True
    return start_ticks is not None and stat[1] != start_ticks


def _signal(pid: int | None, signum: int) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _stop_node_processes(
    nodes: list[NodeState], es_home: str, timeout: float
) -> list[NodeState]:
    """Send SIGTERM to each node, wait up to ``timeout`` s, then SIGKILL.

    Returns the nodes that had to be killed.
    """
    # The launcher counts by pid and start time alone, because right after
    # launch it may still be the bin/elasticsearch shell script.
    live = [
        node
        for node in nodes
        if node.is_running(es_home)
        or not _process_gone(node.launcher_pid, node.launcher_start_ticks)
    ]
    for node in live:
        if node.is_running(es_home):
            logger.info("sending SIGTERM to node %s (pid %s)", node.name, node.pid)
            _signal(node.pid, signal.SIGTERM)
        else:
            # The server JVM has not written its pid yet; the launcher
            # forwards the shutdown to it.
            _signal(node.launcher_pid, signal.SIGTERM)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_node_gone(n) for n in live):
        time.sleep(0.2)

    killed = [node for node in live if not _node_gone(node)]
    for node in killed:
        logger.warning(
            "node %s did not stop within %ss of SIGTERM; sending SIGKILL",
            node.name,
            timeout,
        )
        if not _process_gone(node.pid, node.pid_start_ticks):
            _signal(node.pid, signal.SIGKILL)
        if not _process_gone(node.launcher_pid, node.launcher_start_ticks):
            _signal(node.launcher_pid, signal.SIGKILL)
    # A killed JVM can show as a zombie while its other threads still hold
    # the sockets, so also wait for the ports to be released.
    release_deadline = time.monotonic() + 15
    while time.monotonic() < release_deadline and not all(
        _node_gone(node) and not _node_ports_in_use(node) for node in live
    ):
        time.sleep(0.1)
    return killed


def _node_ports_in_use(node: NodeState) -> bool:
    return port_in_use(node.http_port) or port_in_use(node.transport_port)


def _node_gone(node: NodeState) -> bool:
    return _process_gone(node.pid, node.pid_start_ticks) and _process_gone(
        node.launcher_pid, node.launcher_start_ticks
    )


# --------------------------------------------------------------------------
# Ports and accounts


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """Return whether binding ``host:port`` fails because another socket uses it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def node_ports(http_port: int, nodes: int, transport_port: int | None = None):
    """Return ``(http_ports, transport_ports)`` for ``nodes`` consecutive nodes."""
    first_transport = transport_port or http_port + TRANSPORT_PORT_OFFSET
    http_ports = list(range(http_port, http_port + nodes))
    return http_ports, list(range(first_transport, first_transport + nodes))


def find_free_http_port(
    nodes: int = 1, *, start: int = 19200, end: int = 29000, step: int = 10
) -> int:
    """Return the first http port from ``start`` whose node ports are all free.

    Raises:
        LocalClusterError: no free block below ``end``.
    """
    for candidate in range(start, end, step):
        http_ports, transport_ports = node_ports(candidate, nodes)
        if not any(port_in_use(port) for port in http_ports + transport_ports):
            return candidate
    raise LocalClusterError(f"no free ports for {nodes} node(s) in {start}-{end}")


def _check_ports_free(http_ports: list[int], transport_ports: list[int]) -> None:
    for kind, ports in (("HTTP", http_ports), ("transport", transport_ports)):
        for port in ports:
            if port_in_use(port):
                raise LocalClusterError(
                    f"{kind} port {port} on {LOOPBACK} is already in use",
                    hint="choose another first HTTP port with --port "
                    "(transport ports are the HTTP ports + "
                    f"{TRANSPORT_PORT_OFFSET})",
                )


@dataclasses.dataclass(frozen=True)
class _Account:
    name: str
    uid: int
    gid: int


def _service_account() -> _Account | None:
    """Return the account that runs the nodes, creating it when needed.

    Returns None when esfm does not run as root, so the nodes run as the
    calling user.
    """
    if os.geteuid() != 0:
        return None
    import pwd

    name = os.environ.get("ESFM_SERVICE_USER", SERVICE_USER)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise LocalClusterError(
                f"Elasticsearch cannot run as root and user {name!r} is missing; "
                "useradd is not installed to create it",
                hint=f"create a system user {name!r}, or run esfm as a normal user",
            ) from None
        logger.info("creating system user %s to run Elasticsearch", name)
        command = [useradd, "--system", "--no-create-home"]
        command += ["--shell", "/usr/sbin/nologin", name]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise LocalClusterError(
                f"useradd failed to create user {name!r}: {result.stderr.strip()}"
            ) from None
        entry = pwd.getpwnam(name)
    if entry.pw_uid == 0:
        raise LocalClusterError(
            f"invalid ESFM_SERVICE_USER={name!r}: it is root, and Elasticsearch "
            "does not run as root",
            hint="set ESFM_SERVICE_USER to an unprivileged account",
        )
    return _Account(name, entry.pw_uid, entry.pw_gid)


def _check_reachable(path: Path, account: _Account) -> None:
    # The node account must be able to enter every parent of the directories
    # it uses. Root's home is often mode 700, which this catches early.
    for parent in [path, *path.parents]:
        info = parent.stat()
        if info.st_uid == account.uid:
            allowed = info.st_mode & 0o100
        elif info.st_gid == account.gid:
            allowed = info.st_mode & 0o010
        else:
            allowed = info.st_mode & 0o001
        if not allowed:
            raise LocalClusterError(
                f"user {account.name!r} cannot enter {parent}, which leads to {path}",
                hint="set ESFM_HOME (and ESFM_CACHE_DIR) to a directory that "
                f"{account.name!r} can reach, for example /var/lib/esfm, or run "
                f"chmod o+x {parent}",
            )


# --------------------------------------------------------------------------
# Node configuration


def render_node_config(
    *,
    cluster_name: str,
    node: NodeState,
    all_nodes: list[NodeState],
    security: bool,
) -> str:
    """Return the ``elasticsearch.yml`` text of one node."""
    lines = [
        "# Written by esfm; rewritten on every esfm cluster start.",
        f"cluster.name: esfm-{cluster_name}",
        f"node.name: {node.name}",
        f"network.host: {LOOPBACK}",
        f"http.port: {node.http_port}",
        f"transport.port: {node.transport_port}",
        f"path.data: {json.dumps(node.data_path)}",
        f"path.logs: {json.dumps(node.log_path)}",
        # A development cluster must keep working on a nearly full disk, so
        # the disk watermarks that block shard allocation are off.
        "cluster.routing.allocation.disk.threshold_enabled: false",
        "action.destructive_requires_name: false",
    ]
    if len(all_nodes) == 1:
        lines.append("discovery.type: single-node")
    else:
        seeds = ", ".join(f'"{LOOPBACK}:{n.transport_port}"' for n in all_nodes)
        masters = ", ".join(f'"{n.name}"' for n in all_nodes)
        lines.append(f"discovery.seed_hosts: [{seeds}]")
        lines.append(f"cluster.initial_master_nodes: [{masters}]")
    if security:
        lines.append("xpack.security.enabled: true")
        # HTTP and transport share the node certificate that esfm signs with
        # its own CA; paths are relative to the node's config directory.
        for layer in ("http", "transport"):
            prefix = f"xpack.security.{layer}.ssl"
            lines.append(f"{prefix}.enabled: true")
            lines.append(f"{prefix}.key: {NODE_CERT_DIR}/node.key")
            lines.append(f"{prefix}.certificate: {NODE_CERT_DIR}/node.crt")
            lines.append(f"{prefix}.certificate_authorities: {NODE_CERT_DIR}/ca.crt")
        lines.append("xpack.security.transport.ssl.verification_mode: certificate")
        lines.append("xpack.security.authc.api_key.enabled: true")
        lines.append("xpack.security.authc.token.enabled: true")
    else:
        lines.append("xpack.security.enabled: false")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Security: certificates and the elastic password

NODE_CERT_DIR = "certs"


def _write_private_file(path: Path, text: str) -> None:
    # mkstemp creates the file with mode 600, so the text is never readable
    # by other accounts, not even for a moment.
    descriptor, temporary = tempfile.mkstemp(prefix=".private-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as stream:
            stream.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def read_password_file(path: Path) -> str:
    """Return the password stored in ``path``; warn when other users can read it.

    Raises:
        LocalClusterError: the file is missing, unreadable or empty.
    """
    try:
        mode = path.stat().st_mode
        password = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise LocalClusterError(
            f"cannot read the elastic password file {path}: {exc.strerror}",
            hint="restart the cluster with --clean to set a new password",
        ) from exc
    if mode & 0o077:
        logger.warning(
            "password file %s is readable by other users; run: chmod 600 %s",
            path,
            path,
        )
    if not password:
        raise LocalClusterError(
            f"the elastic password file {path} is empty",
            hint="restart the cluster with --clean to set a new password",
        )
    return password


def _run_es_tool(
    es_home: Path,
    java_home: str,
    tool: str,
    arguments: list[str],
    *,
    conf_dir: Path | None = None,
    stdin: str | None = None,
    account: _Account | None = None,
) -> None:
    """Run ``bin/<tool>`` of the distribution; stdin is never logged or shown.

    With ``account``, the tool runs as that account, because tools such as
    elasticsearch-keystore refuse to rewrite a file that another user owns.
    """
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "ES_JAVA_HOME": java_home,
        "ES_PATH_CONF": str(conf_dir or es_home / "config"),
    }
    options: dict[str, Any] = {}
    if account is not None:
        # The account cannot enter root's home or working directory.
        work_dir = (conf_dir or es_home).parent
        environment["HOME"] = str(work_dir)
        options = {"user": account.uid, "group": account.gid, "extra_groups": []}
        options["cwd"] = work_dir
    command = [str(es_home / "bin" / tool), *arguments]
    user = account.name if account is not None else "the calling user"
    logger.debug("running %s as %s", " ".join(command), user)
    result = subprocess.run(
        command,
        env=environment,
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        **options,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-2000:]
        raise LocalClusterError(
            f"{tool} {' '.join(arguments[:1])} failed with exit status "
            f"{result.returncode} (run as {user}, ES_PATH_CONF="
            f"{environment['ES_PATH_CONF']}): {output}",
            hint=f"the output of {tool} above gives the reason; "
            f"{es_home / 'bin' / tool} ran with Java from {java_home}",
        )


def _unzip_to(zip_path: Path, target: Path) -> None:
    with zipfile.ZipFile(zip_path) as archive:
        for member in archive.infolist():
            name = Path(member.filename)
            if member.is_dir() or name.is_absolute() or ".." in name.parts:
                continue
            destination = target / name.name
            with archive.open(member) as source, open(destination, "wb") as sink:
                shutil.copyfileobj(source, sink)
            os.chmod(destination, 0o600)


def ensure_certificates(es_home: Path, java_home: str, certs_dir: Path) -> Path:
    """Create a CA and a node certificate for 127.0.0.1 with elasticsearch-certutil.

    Writes ``ca.crt``, ``ca.key``, ``node.crt`` and ``node.key`` (mode 600)
    into ``certs_dir`` unless they exist, and returns the path of ``ca.crt``.
    The node certificate's subject alternative names are ``127.0.0.1`` and
    ``localhost``.
    """
    wanted = [certs_dir / f for f in ("ca.crt", "ca.key", "node.crt", "node.key")]
    if all(path.is_file() for path in wanted):
        return certs_dir / "ca.crt"
    certs_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(certs_dir, 0o700)
    with tempfile.TemporaryDirectory(prefix=".certutil-", dir=certs_dir) as scratch:
        ca_zip, node_zip = Path(scratch) / "ca.zip", Path(scratch) / "node.zip"
        tool = "elasticsearch-certutil"
        _run_es_tool(
            es_home, java_home, tool, ["ca", "--pem", "--silent", "--out", str(ca_zip)]
        )
        _unzip_to(ca_zip, certs_dir)
        cert_arguments = ["cert", "--pem", "--silent", "--name", "node"]
        cert_arguments += ["--ca-cert", str(certs_dir / "ca.crt")]
        cert_arguments += ["--ca-key", str(certs_dir / "ca.key")]
        cert_arguments += [
            "--ip",
            LOOPBACK,
            "--dns",
            "localhost",
            "--out",
            str(node_zip),
        ]
        _run_es_tool(es_home, java_home, tool, cert_arguments)
        _unzip_to(node_zip, certs_dir)
    logger.info("created a CA and a node certificate in %s", certs_dir)
    return certs_dir / "ca.crt"


def certificate_fingerprint(pem_path: Path) -> str:
    """Return the SHA-256 fingerprint of a PEM certificate, as lowercase hex."""
    der = ssl.PEM_cert_to_DER_cert(pem_path.read_text(encoding="ascii"))
    return hashlib.sha256(der).hexdigest()


def _ensure_password(base: Path, clean: bool) -> Path:
    # The bootstrap password sets the elastic password only while the
    # .security index does not exist, so a restart without --clean must keep
    # the password of the previous run.
    path = base / PASSWORD_FILE
    if path.is_file() and not clean:
        return path
    _write_private_file(path, secrets.token_urlsafe(24) + "\n")
    logger.info("wrote a new elastic password to %s (mode 600)", path)
    return path


def _install_node_security(
    es_home: Path,
    java_home: str,
    node_dir: Path,
    certs_dir: Path,
    password: str,
    account: _Account | None,
) -> None:
    """Copy the certificates into a node's config and set its bootstrap password.

    A restart rewrites both, so a stopped cluster starts again with the files
    and the password of its first run.
    """
    node_certs = node_dir / "config" / NODE_CERT_DIR
    node_certs.mkdir(exist_ok=True)
    for file_name in ("ca.crt", "node.crt", "node.key"):
        shutil.copyfile(certs_dir / file_name, node_certs / file_name)
        os.chmod(node_certs / file_name, 0o600)
    _run_es_tool(
        es_home,
        java_home,
        "elasticsearch-keystore",
        ["add", "--force", "--stdin", "bootstrap.password"],
        conf_dir=node_dir / "config",
        stdin=password,
        account=account,
    )


def _chown_tree(root: Path, account: _Account | None) -> None:
    if account is None:
        return
    for directory, _subdirs, files in os.walk(root):
        os.chown(directory, account.uid, account.gid)
        for file_name in files:
            os.chown(Path(directory) / file_name, account.uid, account.gid)


def _prepare_node_dirs(
    es_home: Path,
    node_dir: Path,
    config_text: str,
    heap: str,
    account: _Account | None,
    clean: bool,
) -> None:
    config = node_dir / "config"
    if clean and node_dir.exists():
        for child in ("data", "logs"):
            shutil.rmtree(node_dir / child, ignore_errors=True)
    for child in ("data", "logs", "tmp"):
        (node_dir / child).mkdir(parents=True, exist_ok=True)
    if not config.exists():
        shutil.copytree(es_home / "config", config)
    (config / "elasticsearch.yml").write_text(config_text)
    options = config / "jvm.options.d"
    options.mkdir(exist_ok=True)
    (options / "esfm-heap.options").write_text(f"-Xms{heap}\n-Xmx{heap}\n")

    os.chmod(node_dir, 0o750)
    _chown_tree(node_dir, account)


def _launch_node(
    state: ClusterState, node: NodeState, account: _Account | None
) -> None:
    node_dir = Path(node.config_path).parent
    pid_file = node_dir / "elasticsearch.pid"
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()

    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "HOME": str(node_dir),
        "ES_JAVA_HOME": state.java_home,
        "ES_PATH_CONF": node.config_path,
        "ES_TMPDIR": str(node_dir / "tmp"),
    }
    command = [str(Path(state.es_home) / "bin" / "elasticsearch"), "-p", str(pid_file)]

    options: dict[str, Any] = {}
    if account is not None:
        # extra_groups=[] drops root's supplementary groups as well.
        options = {"user": account.uid, "group": account.gid, "extra_groups": []}
    stdout_path = node_dir / "logs" / "stdout.log"
    with open(stdout_path, "ab") as stdout:
        if account is not None:
            os.chown(stdout_path, account.uid, account.gid)
        process = subprocess.Popen(
            command,
            cwd=node_dir,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **options,
        )

    _CHILDREN[process.pid] = process
    node.launcher_pid = process.pid
    stat = _proc_stat(process.pid)
    node.launcher_start_ticks = stat[1] if stat else None
    node.pid = None
    node.pid_start_ticks = None
    node.started_at = _now()
    logger.info(
        "launched node %s of cluster %s (launcher pid %s, http port %s)",
        node.name,
        state.name,
        process.pid,
        node.http_port,
    )


def _read_server_pid(node: NodeState) -> None:
    if node.pid is not None:
        return
    pid_file = Path(node.config_path).parent / "elasticsearch.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    stat = _proc_stat(pid)
    if stat is not None:
        node.pid, node.pid_start_ticks = pid, stat[1]


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(0, stream.tell() - 64 * 1024))
            text = stream.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def node_log_tail(state: ClusterState, node: NodeState) -> str:
    """Return the last lines of a node's console output, else of its server log.

    The console output contains what the launcher printed before logging was
    set up, such as an invalid setting or a missing Java.
    """
    console_log = Path(node.log_path) / "stdout.log"
    server_log = Path(node.log_path) / f"esfm-{state.name}.log"
    for path in (console_log, server_log):
        if path.exists() and path.stat().st_size:
            return f"--- {path} ---\n{_tail(path)}"
    return f"(no log output in {node.log_path})"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------
# HTTP


@dataclasses.dataclass(frozen=True)
class HttpAccess:
    """CA file and basic-auth credentials for requests to a secured node."""

    ca_certs: str | None = None
    credentials: tuple[str, str] | None = None

    def __repr__(self) -> str:
        user = self.credentials[0] if self.credentials else None
        return f"HttpAccess(ca_certs={self.ca_certs!r}, user={user!r})"


def http_access(state: ClusterState) -> HttpAccess | None:
    """Return what requests to ``state``'s nodes need, or None when unsecured."""
    if not state.security:
        return None
    return HttpAccess(ca_certs=state.ca_certs, credentials=state.credentials())


def _get_json(
    url: str, path: str, timeout: float = 5.0, access: HttpAccess | None = None
) -> Any:
    headers = {"Accept": "application/json"}
    context = None
    if access is not None:
        if access.credentials is not None:
            token = base64.b64encode(":".join(access.credentials).encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        if url.startswith("https://"):
            context = ssl.create_default_context(cafile=access.ca_certs)
    request = urllib.request.Request(url + path, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return json.loads(response.read())


def cluster_health(
    url: str,
    *,
    request_timeout: float = 5.0,
    access: HttpAccess | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Return ``GET /_cluster/health`` of the node at ``url``.

    ``params`` are query parameters such as ``wait_for_nodes=3`` or
    ``timeout="1s"``. A 408 from a wait that timed out still returns the
    health document, whose ``timed_out`` is then true. ``access`` carries the
    CA file and credentials of a secured node.
    """
    query = urllib.parse.urlencode(params)
    path = "/_cluster/health" + (f"?{query}" if query else "")
    try:
        return _get_json(url, path, request_timeout, access)
    except urllib.error.HTTPError as exc:
        if exc.code == 408:
            return json.loads(exc.read())
        raise


def _wait_until_healthy(
    state: ClusterState,
    nodes: list[NodeState],
    expected_nodes: int,
    wait_timeout: float,
    on_progress: ProgressCallback | None,
) -> dict[str, Any]:
    deadline = time.monotonic() + wait_timeout
    last_error = "no answer yet"
    access = http_access(state)
    while True:
        for node in nodes:
            _read_server_pid(node)
            if _node_gone(node):
                raise _StartFailed(node, "exited during startup")
        joined = 0
        # The progress message names the phase only. The raw error, such as
        # "Connection refused" before the node listens, repeats on every
        # poll, so only its changes go to the debug log, and the last one
        # goes into the timeout error.
        message = f"waiting for {expected_nodes} node(s) to respond"
        try:
            health = cluster_health(
                nodes[0].url,
                wait_for_nodes=f">={expected_nodes}",
                wait_for_status="yellow",
                timeout="1s",
                access=access,
            )
        except (OSError, ValueError) as exc:
            if str(exc) != last_error:
                logger.debug("%s has not responded yet: %s", nodes[0].url, exc)
            last_error = str(exc)
        else:
            joined = health.get("number_of_nodes", 0)
            ready = not health.get("timed_out") and health["status"] != "red"
            if ready and all(node.pid is not None for node in nodes):
                _notify(
                    on_progress,
                    "wait",
                    "cluster is healthy",
                    completed=expected_nodes,
                    total=expected_nodes,
                )
                return health
            last_error = f"health {health.get('status')}, {joined} node(s) joined"
            message = f"waiting for {expected_nodes} node(s): {last_error}"
        _notify(
            on_progress,
            "wait",
            message,
            completed=joined,
            total=expected_nodes,
        )
        if time.monotonic() > deadline:
            raise _StartFailed(
                nodes[0], f"not healthy after {wait_timeout}s ({last_error})"
            )
        time.sleep(1)


class _StartFailed(Exception):
    def __init__(self, node: NodeState, reason: str) -> None:
        super().__init__(reason)
        self.node = node
        self.reason = reason


# --------------------------------------------------------------------------
# Validation


def _validate_name(name: str) -> None:
    if not _NAME_PATTERN.match(name):
        raise LocalClusterError(
            f"invalid cluster name {name!r}",
            hint="use up to 64 letters, digits, '.', '_' or '-', starting with "
            "a letter or digit",
        )


def _validate_version(version: str) -> None:
    if not _VERSION_PATTERN.match(version):
        raise LocalClusterError(
            f"invalid Elasticsearch version {version!r}",
            hint=f"give MAJOR.MINOR.PATCH, for example {DEFAULT_VERSION}",
        )


def _validate_start_options(
    name: str, nodes: int, http_port: int, transport_port: int | None, heap: str
) -> None:
    _validate_name(name)
    if nodes < 1:
        raise LocalClusterError(f"invalid node count {nodes}; give 1 or more")
    if not _HEAP_PATTERN.match(heap):
        raise LocalClusterError(
            f"invalid heap size {heap!r}",
            hint="give a size in MiB or GiB, for example 512m or 1g",
        )
    http_ports, transport_ports = node_ports(http_port, nodes, transport_port)
    for port in http_ports + transport_ports:
        if not 1024 <= port <= 65535:
            raise LocalClusterError(
                f"port {port} is outside 1024-65535",
                hint="choose another first HTTP port with --port",
            )
    if set(http_ports) & set(transport_ports):
        raise LocalClusterError(
            f"HTTP ports {http_ports} overlap transport ports {transport_ports}",
            hint="choose another transport port",
        )


def _make_dirs(path: Path) -> None:
    # Directories esfm creates get mode 755 whatever the umask, so that the
    # node account can enter them. Existing directories keep their mode.
    missing = []
    for parent in [path, *path.parents]:
        if parent.exists():
            break
        missing.append(parent)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
            os.chmod(directory, 0o755)


# --------------------------------------------------------------------------
# Operations


def start(
    *,
    name: str = "default",
    nodes: int = 1,
    http_port: int = DEFAULT_HTTP_PORT,
    transport_port: int | None = None,
    heap: str | None = None,
    version: str | None = None,
    security: bool = False,
    wait_timeout: float = 180,
    clean: bool = False,
    dist_zip: str | os.PathLike[str] | None = None,
    home: Path | None = None,
    cache_dir: Path | None = None,
    on_progress: ProgressCallback | None = None,
) -> ClusterState:
    """Start a local cluster of ``nodes`` nodes and wait until it is healthy.

    Node ``i`` listens on ``127.0.0.1:http_port+i`` (HTTP) and
    ``127.0.0.1:transport_port+i`` (transport; default ``http_port + 100``).
    The nodes run in their own session, so they outlive the calling process;
    stop them with :func:`stop`. Healthy means every node joined and the
    cluster health is yellow or green.

    Args:
        heap: JVM heap per node such as ``"1g"``; defaults to 1g for one node
            and 512m each for several.
        version: Elasticsearch version; defaults to the version inside
            ``dist_zip``, else :data:`DEFAULT_VERSION`.
        security: enable x-pack security: TLS on HTTP and transport with a
            CA and node certificate made by ``bin/elasticsearch-certutil``,
            and an ``elastic`` password set through the keystore's
            ``bootstrap.password``. The password goes to a mode-600 file
            named by ``ClusterState.password_file``, never to the state file.
        wait_timeout: seconds to wait for a healthy cluster.
        clean: delete the data and log directories of a previous run first.
        dist_zip: local distribution zip, default ``$ESFM_ES_DIST``.
        home: state directory, default :func:`default_home`.
        cache_dir: distribution cache, default :func:`default_cache_dir`.

    Raises:
        LocalClusterError: invalid options, the cluster already runs, a port
            is in use, Java or mvn is missing, or a node failed to start. In
            the last case the message contains the end of the node's log,
            and the nodes started so far are stopped.
    """
    heap = heap or (DEFAULT_HEAP if nodes == 1 else DEFAULT_MULTI_NODE_HEAP)
    _validate_start_options(name, nodes, http_port, transport_port, heap)
    if version is not None:
        _validate_version(version)
    home = Path(home) if home is not None else default_home()

    with _cluster_lock(name, home):
        existing = read_state(name, home=home)
        if existing is not None and existing.is_running():
            raise LocalClusterError(
                f"local cluster {name!r} is already running at {existing.url}",
                hint=f"see it with: esfm cluster status --name {name}; stop it "
                f"with: esfm cluster stop --name {name}",
            )
        if existing is not None:
            logger.info("removing stale state of stopped cluster %s", name)
            state_path(name, home).unlink()

        http_ports, transport_ports = node_ports(http_port, nodes, transport_port)
        _check_ports_free(http_ports, transport_ports)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        _make_dirs(cache)
        es_home = ensure_distribution(
            version, cache_dir=cache, dist_zip=dist_zip, on_progress=on_progress
        )
        version = es_home.name.removeprefix("elasticsearch-")
        java = find_java(version)
        account = _service_account()
        base = cluster_dir(name, home)
        _make_dirs(base)
        if account is not None:
            for path in (es_home, base, java.home):
                _check_reachable(path, account)

        state = _new_state(name, version, es_home, java, account, base, security)
        scheme = "https" if security else "http"
        state.nodes = _new_nodes(name, base, http_ports, transport_ports, scheme)
        if security:
            _prepare_security(state, es_home, base, clean)
        for node in state.nodes:
            config_text = render_node_config(
                cluster_name=name, node=node, all_nodes=state.nodes, security=security
            )
            node_dir = Path(node.config_path).parent
            _prepare_node_dirs(es_home, node_dir, config_text, heap, account, clean)
            if security:
                _install_node_security(
                    es_home,
                    state.java_home,
                    node_dir,
                    base / NODE_CERT_DIR,
                    read_password_file(Path(state.password_file or "")),
                    account,
                )
                _chown_tree(node_dir, account)

        _launch_and_wait(state, state.nodes, account, wait_timeout, on_progress)
        logger.info(
            "local cluster %s (Elasticsearch %s, %s node(s)) is healthy at %s",
            name,
            version,
            nodes,
            state.url,
        )
        return state


def _new_state(name, version, es_home, java, account, base, security) -> ClusterState:
    return ClusterState(
        name=name,
        version=version,
        es_home=str(es_home),
        java_home=str(java.home),
        user=account.name if account else None,
        security=security,
        started_at=_now(),
        nodes=[],
        path=base / "state.json",
    )


def _prepare_security(
    state: ClusterState, es_home: Path, base: Path, clean: bool
) -> None:
    ca_path = ensure_certificates(es_home, state.java_home, base / NODE_CERT_DIR)
    state.ca_certs = str(ca_path)
    state.ssl_fingerprint = certificate_fingerprint(base / NODE_CERT_DIR / "node.crt")
    state.password_file = str(_ensure_password(base, clean))


def _new_nodes(
    name: str,
    base: Path,
    http_ports: list[int],
    transport_ports: list[int],
    scheme: str = "http",
) -> list[NodeState]:
    nodes = []
    for index, (http, transport) in enumerate(
        zip(http_ports, transport_ports, strict=True)
    ):
        node_dir = base / f"node-{index}"
        nodes.append(
            NodeState(
                index=index,
                name=f"{name}-node-{index}",
                http_port=http,
                transport_port=transport,
                url=f"{scheme}://{LOOPBACK}:{http}",
                config_path=str(node_dir / "config"),
                data_path=str(node_dir / "data"),
                log_path=str(node_dir / "logs"),
            )
        )
    return nodes


def _launch_and_wait(
    state: ClusterState,
    nodes: list[NodeState],
    account: _Account | None,
    wait_timeout: float,
    on_progress: ProgressCallback | None,
) -> None:
    """Launch ``nodes`` and wait for a healthy cluster; undo the launch on failure.

    For a whole-cluster start, a failure removes the state file; when some
    nodes keep running (start_node), it records the failed nodes as stopped.
    """
    assert state.path is not None
    whole_cluster = len(nodes) == len(state.nodes)
    expected = len({n.index for n in state.running_nodes()} | {n.index for n in nodes})
    launched: list[NodeState] = []
    try:
        for node in nodes:
            _notify(on_progress, "launch", f"launching {node.name}")
            _launch_node(state, node, account)
            launched.append(node)
        write_state(state, state.path)
        _wait_until_healthy(state, nodes, expected, wait_timeout, on_progress)
    except BaseException as exc:
        _stop_node_processes(launched, state.es_home, timeout=15)
        for node in launched:
            _clear_pids(node)
        if whole_cluster:
            with contextlib.suppress(FileNotFoundError):
                state.path.unlink()
        else:
            write_state(state, state.path)
        if isinstance(exc, _StartFailed):
            tail = node_log_tail(state, exc.node)
            raise LocalClusterError(
                f"node {exc.node.name} of local cluster {state.name!r} "
                f"{exc.reason}; stopped the nodes it started. "
                f"Last log lines:\n{tail}",
                hint=f"read the full logs in {exc.node.log_path}",
            ) from None
        raise
    write_state(state, state.path)


def _clear_pids(node: NodeState) -> None:
    node.pid = node.pid_start_ticks = None
    node.launcher_pid = node.launcher_start_ticks = None


def _require_state(name: str, home: Path | None) -> ClusterState:
    state = read_state(name, home=home)
    if state is None:
        raise LocalClusterError(
            f"no local cluster named {name!r} (no {state_path(name, home)})",
            hint=f"start one with: esfm cluster start --name {name}",
        )
    return state


def _require_node(state: ClusterState, index: int) -> NodeState:
    if not 0 <= index < len(state.nodes):
        raise LocalClusterError(
            f"local cluster {state.name!r} has no node {index}; "
            f"valid indexes are 0-{len(state.nodes) - 1}"
        )
    return state.nodes[index]


@dataclasses.dataclass(frozen=True)
class StopResult:
    """Nodes stopped by :func:`stop`; ``killed`` needed SIGKILL after the timeout."""

    name: str
    stopped: list[str]
    killed: list[str]


def stop(
    name: str = "default",
    *,
    timeout: float = 60,
    home: Path | None = None,
    on_progress: ProgressCallback | None = None,
) -> StopResult:
    """Stop every node with SIGTERM, then SIGKILL after ``timeout`` s.

    Removes the state file. Data directories stay; see :func:`wipe`. Stopping
    a cluster that has no state file does nothing and returns a result with
    no stopped nodes, so a second stop succeeds.

    Raises:
        LocalClusterError: ``name`` is not a valid cluster name.
    """
    with _cluster_lock(name, home):
        state = read_state(name, home=home)
        if state is None:
            logger.info("local cluster %s is not running; nothing to stop", name)
            return StopResult(name, [], [])
        running = [node.name for node in state.nodes if node.is_running(state.es_home)]
        _notify(on_progress, "stop", f"stopping {len(running)} node(s) of {name}")
        killed = _stop_node_processes(state.nodes, state.es_home, timeout)
        assert state.path is not None
        state.path.unlink()
    logger.info("stopped local cluster %s", name)
    return StopResult(name, running, [node.name for node in killed])


def stop_node(
    name: str, index: int, *, timeout: float = 60, home: Path | None = None
) -> bool:
    """Stop node ``index`` of cluster ``name`` and keep the others running.

    Returns True when the node needed SIGKILL after ``timeout`` seconds.

    Raises:
        LocalClusterError: no such cluster or node, or the node is not running.
    """
    with _cluster_lock(name, home):
        state = _require_state(name, home)
        node = _require_node(state, index)
        if not node.is_running(state.es_home):
            raise LocalClusterError(
                f"node {node.name} of local cluster {name!r} is not running",
                hint=f"start it with esfm.cluster.start_node({name!r}, {index})",
            )
        killed = _stop_node_processes([node], state.es_home, timeout)
        _clear_pids(node)
        assert state.path is not None
        write_state(state, state.path)
    logger.info("stopped node %s of local cluster %s", node.name, name)
    return bool(killed)


def start_node(
    name: str,
    index: int,
    *,
    wait_timeout: float = 180,
    home: Path | None = None,
    on_progress: ProgressCallback | None = None,
) -> NodeState:
    """Start node ``index`` again after :func:`stop_node`, and wait until it joined.

    Raises:
        LocalClusterError: no such cluster or node, the node already runs, its
            ports are in use, or it failed to start (with the end of its log).
    """
    with _cluster_lock(name, home):
        state = _require_state(name, home)
        node = _require_node(state, index)
        if node.is_running(state.es_home):
            raise LocalClusterError(
                f"node {node.name} of local cluster {name!r} is already running"
            )
        _check_ports_free([node.http_port], [node.transport_port])
        account = _service_account()
        _launch_and_wait(state, [node], account, wait_timeout, on_progress)
    logger.info("started node %s of local cluster %s", node.name, name)
    return node


def wipe(name: str = "default", *, home: Path | None = None) -> Path:
    """Delete the directory of a stopped cluster: its data, logs and config.

    Returns the deleted directory.

    Raises:
        LocalClusterError: the cluster is running.
    """
    with _cluster_lock(name, home):
        state = read_state(name, home=home)
        if state is not None and state.is_running():
            raise LocalClusterError(
                f"local cluster {name!r} is running; stop it before deleting its data",
                hint=f"esfm cluster stop --name {name}",
            )
        directory = cluster_dir(name, home)
        shutil.rmtree(directory, ignore_errors=True)
    logger.info("deleted local cluster directory %s", directory)
    return directory


@dataclasses.dataclass(frozen=True)
class NodeStatus:
    """Whether one node runs, with its ports and pid."""

    index: int
    name: str
    running: bool
    pid: int | None
    http_port: int
    transport_port: int
    url: str


@dataclasses.dataclass(frozen=True)
class ClusterStatus:
    """A local cluster's processes and, when it responds, its health.

    ``version`` is the version that the first running node reports, else the
    version recorded at start. ``health`` is the ``_cluster/health`` document
    or None, with the reason in ``error``.
    """

    name: str
    version: str
    url: str
    running: bool
    nodes: list[NodeStatus]
    health: dict[str, Any] | None
    error: str | None
    state_path: str
    security: bool = False
    ca_certs: str | None = None
    password_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the status as a JSON-ready dict."""
        return dataclasses.asdict(self)


def status(name: str = "default", *, home: Path | None = None) -> ClusterStatus:
    """Return the processes, health and version of local cluster ``name``.

    Raises:
        LocalClusterError: there is no state file for ``name``.
    """
    state = _require_state(name, home)
    nodes = [
        NodeStatus(
            index=node.index,
            name=node.name,
            running=node.is_running(state.es_home),
            pid=node.pid,
            http_port=node.http_port,
            transport_port=node.transport_port,
            url=node.url,
        )
        for node in state.nodes
    ]
    running = any(node.running for node in nodes)
    health, error, version = None, None, state.version
    if not running:
        error = "no node process is running"
    else:
        try:
            access = http_access(state)
            health = cluster_health(state.url, access=access)
            local = _get_json(state.url, "/_nodes/_local", access=access)
            version = next(iter(local["nodes"].values()))["version"]
        except (OSError, ValueError, KeyError, StopIteration) as exc:
            error = f"{state.url} did not answer: {exc}"
    return ClusterStatus(
        name=state.name,
        version=version,
        url=state.url,
        running=running,
        nodes=nodes,
        health=health,
        error=error,
        state_path=str(state.path),
        security=state.security,
        ca_certs=state.ca_certs,
        password_file=state.password_file,
    )
