"""A Flower deployment on one machine (the tooling, not the protocol): a SuperLink and one SuperNode per site on 127.0.0.1, then ``flwr run``.

For trying scinfl's apps out (``scinfl flower-local``), the tests and the benchmark. By default it runs
TLS with a certificate authority of its own and SuperNode authentication with a key pair per site made for
it; real sites run the same commands on their own machines, with their certificates and keys
(``docs/across_sites.md``).
Every process started here runs in its own process group and is stopped, group and all, on
:meth:`LocalDeployment.close`; nothing is downloaded at run time (the SuperLink runs with
``--disable-runtime-dependency-installation``, telemetry and update checks are off).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from .data.sites import check_site_file
from .federation.checkpoint import checkpoint_path
from .federation.flower.run_config import MODEL_DIR, app_pyproject, preprocessing_run_config, run_config
from .federation.identity import write_consortium
from .federation.spec import RunSpec

__all__ = [
    "LocalDeployment",
    "app_pyproject",
    "flower_environment",
    "free_port",
    "log_tail",
    "preprocessing_run_config",
    "run_config",
    "run_local_deployment",
    "site_nodes",
    "write_local_ca",
    "write_supernode_key",
]

logger = logging.getLogger("scinfl")

CONNECTION = "scinfl-local"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_environment(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's processes: a private ``FLWR_HOME``, no telemetry, no update check."""
    env = dict(os.environ if base is None else base)
    # flower-superlink starts flower-superexec by name: find it beside this interpreter even when the
    # environment's bin directory is not on PATH (a virtual environment used without activating it)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(
        [bin_dir, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir)]
    )
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        # The SuperExec looks for new ServerApp/ClientApp tasks every second by default; a shorter poll
        # starts each round's ClientApp processes sooner.
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL=env.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2"),
    )
    return env


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:  # its cause is in its log: say it here, not only there
            raise RuntimeError(
                f"{what} exited with code {process.returncode} while starting. Its log ({log}) ends with:\n"
                f"{log_tail(log, lines=15)}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not open port {port} within {timeout:g} s.")


def site_nodes(
    sites: Mapping[str, Any],
    directory: str | os.PathLike[str],
    key_path: str | os.PathLike[str] | None = None,
) -> dict[str, dict[str, str]]:
    """Write each site (an AnnData, its registration inside) to ``directory/<site>.h5ad`` and return the
    SuperNodes' node configs for :class:`LocalDeployment`: its file, and the key file if any."""
    directory = Path(directory)
    nodes = {}
    for name, adata in sites.items():
        path = directory / f"{name}.h5ad"
        adata.write_h5ad(path)
        nodes[name] = {"data-path": str(path)} | ({} if key_path is None else {"key-path": str(key_path)})
    return nodes


def write_local_ca(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """A certificate authority of this deployment's own and a SuperLink certificate it signs, for
    127.0.0.1 and localhost (ECDSA P-256, 30 days), written into ``directory`` (private keys 0600).

    Returns the paths: ``ca`` (what SuperNodes and ``flwr`` verify the SuperLink with), ``certificate``
    and ``private_key`` (the SuperLink's). Across machines, use your institution's certificates instead.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid = {
        "not_valid_before": now - datetime.timedelta(minutes=5),
        "not_valid_after": now + datetime.timedelta(days=30),
    }
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scinfl local deployment CA")])
    ca = (
        x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=ca_name,
            serial_number=x509.random_serial_number(),
            public_key=ca_key.public_key(),
            **valid,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    certificate = (
        x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]),
            serial_number=x509.random_serial_number(),
            public_key=key.public_key(),
            **valid,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca": directory / "ca.crt",
        "certificate": directory / "superlink.crt",
        "private_key": directory / "superlink.key",
    }
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["certificate"].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    descriptor = os.open(paths["private_key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return paths


def write_supernode_key(path: str | os.PathLike[str]) -> dict[str, Path]:
    """A SuperNode's authentication key pair (ECDSA P-384) in the OpenSSH format Flower reads: the private
    key at ``path`` (0600; the SuperNode's ``--auth-supernode-private-key``) and the public key at
    ``path + ".pub"`` (what the consortium registers: ``flwr supernode register``).

    Flower refuses a PKCS#8 private key (exit code 302); ``ssh-keygen -t ecdsa -b 384`` makes the same pair.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
    public = path.with_name(path.name + ".pub")
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return {"private_key": path, "public_key": public}


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _json_output(text: str) -> Any:
    """The JSON object a ``flwr ... --format json`` command printed. Its output is styled (ANSI escapes)
    when it believes it writes to a terminal, as under a Jupyter kernel (``FORCE_COLOR``)."""
    text = _ANSI_ESCAPE.sub("", text)
    return json.loads(text[text.index("{") :])


def _public_key_file(private_key: Path, public: Path) -> Path:
    """Write the OpenSSH public key of an OpenSSH private key file to ``public``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_ssh_private_key(private_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"a {type(key).__name__.removeprefix('_')}, not an EC key")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{private_key} is not a SuperNode key Flower can read (an unencrypted OpenSSH EC private key, "
            f"e.g. from write_supernode_key or `ssh-keygen -t ecdsa -b 384`): {error}"
        ) from error
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return public


class LocalDeployment:
    """A SuperLink and one SuperNode per site on 127.0.0.1, each in its own process group.

    Parameters
    ----------
    workdir
        Holds ``FLWR_HOME``, the Flower App (a ``pyproject.toml``) and every process's log.
    nodes
        Site name -> that SuperNode's ``--node-config`` (``data-path``, and ``key-path`` for a keyed run;
        ``site`` is set from the name).
    start_timeout
        Seconds the SuperLink may take to open its port.
    tls
        Encrypt every connection with TLS (the default): the deployment makes a certificate authority of its
        own (:func:`write_local_ca`), the SuperLink serves its certificate and the SuperNodes and ``flwr``
        verify it. A mapping of ``ca``, ``certificate`` and ``private_key`` paths uses those files instead.
        ``False`` runs with ``--insecure``: traffic in the clear, an explicit choice.
    authenticate
        SuperNode authentication (default: on with TLS, which Flower requires for it): the SuperLink lets in
        only SuperNodes whose public key was registered (``--enable-supernode-auth``); each site's key pair
        is registered at :meth:`start` and its SuperNode signs with the private key. A registered SuperNode
        keeps its node ID when it restarts.
    supernode_keys
        Site -> its SuperNode's private key file (OpenSSH EC, as Flower reads it); sites not named get one
        made in ``workdir/auth`` (:func:`write_supernode_key`).

    Use it as a context manager: leaving the block stops every process it started.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        nodes: Mapping[str, Mapping[str, Any]],
        *,
        start_timeout: float = 60.0,
        tls: bool | Mapping[str, str | os.PathLike[str]] = True,
        authenticate: bool | None = None,
        supernode_keys: Mapping[str, str | os.PathLike[str]] | None = None,
    ) -> None:
        authenticate = bool(tls) if authenticate is None else authenticate
        if authenticate and not tls:
            raise ValueError(
                "SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth with --insecure): "
                "pass authenticate=False with tls=False."
            )
        if supernode_keys and not authenticate:
            raise ValueError("SuperNode keys were given, but SuperNode authentication is off.")
        unknown = sorted(set(supernode_keys or {}) - set(nodes))
        if unknown:
            raise ValueError(f"SuperNode keys for sites that are not in the deployment: {unknown}.")
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nodes = {site: {**config, "site": site} for site, config in nodes.items()}
        # Each SuperNode's site identity and the consortium's roster (secure aggregation checks its peers'
        # masking keys against them): made here for every site unless the node configs name their own.
        named = [site for site, config in self.nodes.items() if config.get("identity-path")]
        if named and len(named) < len(self.nodes):
            raise ValueError(
                f"Sites {named} name an identity-path and the others do not: give every site its identity and "
                "the consortium's roster, or none (the deployment then makes them)."
            )
        if not named:
            consortium = write_consortium(self.workdir / "identities", list(self.nodes))
            self.nodes = {site: {**config, **consortium[site]} for site, config in self.nodes.items()}
        self.start_timeout = start_timeout
        self.env = flower_environment(self.workdir / "flwr_home")
        self.port = 0
        self.processes: dict[str, subprocess.Popen] = {}
        if isinstance(tls, Mapping):
            missing = [name for name in ("ca", "certificate", "private_key") if name not in tls]
            if missing:
                raise ValueError(f"tls= names the ca, certificate and private_key files; {missing} missing.")
            self.tls = {name: Path(tls[name]).absolute() for name in ("ca", "certificate", "private_key")}
        else:
            self.tls = write_local_ca(self.workdir / "tls") if tls else None
        self.authenticate = authenticate
        self.supernode_keys = {
            site: Path(path).absolute() for site, path in dict(supernode_keys or {}).items()
        }
        self.node_ids: dict[str, int] = {}  # site -> the node ID its registered key was given
        self._started: set[str] = set()  # sites whose SuperNode was started once

    def _spawn(self, name: str, command: Sequence[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 -- lives as long as the process
        try:
            process = subprocess.Popen(
                list(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,  # its own process group, so that close() stops its children too
            )
        finally:
            log.close()
        self.processes[name] = process
        return process

    def start(self) -> LocalDeployment:
        """Start the SuperLink, wait for its port, then start one SuperNode per site."""
        bin_dir = Path(sys.executable).parent
        self.port = free_port()
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            tomli_w.dumps(
                {
                    "superlink": {
                        "default": CONNECTION,
                        CONNECTION: {"address": f"127.0.0.1:{self.port}"}
                        | (
                            {"insecure": True}
                            if self.tls is None
                            else {"root-certificates": str(self.tls["ca"])}
                        ),
                    }
                }
            )
        )
        superlink = self._spawn(
            "superlink",
            [
                str(bin_dir / "flower-superlink"),
                *(
                    ["--insecure"]
                    if self.tls is None
                    else [
                        "--ssl-ca-certfile",
                        str(self.tls["ca"]),
                        "--ssl-certfile",
                        str(self.tls["certificate"]),
                        "--ssl-keyfile",
                        str(self.tls["private_key"]),
                    ]
                ),
                *(["--enable-supernode-auth"] if self.authenticate else []),
                "--disable-runtime-dependency-installation",  # else it installs the app's dependencies
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
        )
        _wait_for_port(
            self.port, superlink, self.start_timeout, "flower-superlink", self.workdir / "superlink.log"
        )
        if self.authenticate:
            for site in self.nodes:
                self.supernode_keys.setdefault(
                    site, write_supernode_key(self.workdir / "auth" / f"{site}.key")["private_key"]
                )
            self.node_ids = self.register_supernodes({site: self.supernode_keys[site] for site in self.nodes})
        for site in self.nodes:
            self.start_supernode(site)
        return self

    def register_supernodes(self, private_keys: Mapping[str, str | os.PathLike[str]]) -> dict[str, int]:
        """Register each named SuperNode's public key with the SuperLink (``flwr supernode register``, all at
        once); return the node ID each was given. Raises naming the site whose key was refused."""
        directory = self.workdir / "auth"
        directory.mkdir(parents=True, exist_ok=True)
        flwr = str(Path(sys.executable).parent / "flwr")
        running = {}
        for site, path in private_keys.items():
            try:
                public_key = _public_key_file(Path(path), directory / f"{site}.pub")
            except ValueError as error:
                raise ValueError(f"Site {site!r}: {error}") from None
            running[site] = subprocess.Popen(
                [flwr, "supernode", "register", str(public_key), CONNECTION, "--format", "json"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
                text=True,
            )
        node_ids = {}
        for site, process in running.items():
            output, _ = process.communicate(timeout=120)
            try:
                node_ids[site] = int(_json_output(output)["node-id"])
            except (ValueError, KeyError) as error:
                raise RuntimeError(
                    f"Site {site!r}: its SuperNode key was not registered (flwr supernode register exited with "
                    f"{process.returncode}):\n{output[-2000:]}"
                ) from error
        return node_ids

    def node_status(self) -> dict[int, str]:
        """Node ID -> status (``registered``, ``online``, ``offline``) of every node the SuperLink knows
        (``flwr supernode list``)."""
        listed = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "supernode", "list", CONNECTION, "--format", "json"],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        try:
            nodes = _json_output(listed.stdout)["nodes"]
        except (ValueError, KeyError) as error:
            raise RuntimeError(
                f"flwr supernode list failed:\n{(listed.stdout + listed.stderr)[-2000:]}"
            ) from error
        return {int(node["node-id"]): node["status"] for node in nodes}

    def start_supernode(self, site: str, *, offline_timeout: float = 120.0) -> subprocess.Popen:
        """Start (or restart) the SuperNode of ``site``.

        Flower refuses to activate an authenticated node that still counts as online (exit code 305), as
        a crashed SuperNode's does for up to two heartbeats (about a minute): a restart waits, up to
        ``offline_timeout`` seconds, until the SuperLink has marked it offline."""
        node_id = self.node_ids.get(site) if self.authenticate else None
        restarted = site in self._started and f"supernode-{site}" not in self.processes
        self._started.add(site)
        if node_id is not None and restarted:
            deadline = time.monotonic() + offline_timeout
            while self.node_status().get(node_id) == "online":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Site {site!r}: its node {node_id} still counts as online.")
                time.sleep(2)
        # The node config as a TOML file (which --node-config also takes): paths with spaces stay whole.
        node_config = self.workdir / f"node-{site}.toml"
        node_config.write_text(tomli_w.dumps({k: str(v) for k, v in self.nodes[site].items()}))
        return self._spawn(
            f"supernode-{site}",
            [
                str(Path(sys.executable).parent / "flower-supernode"),
                *(["--insecure"] if self.tls is None else ["--root-certificates", str(self.tls["ca"])]),
                *(
                    ["--auth-supernode-private-key", str(self.supernode_keys[site])]
                    if self.authenticate
                    else []
                ),
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--port",
                str(free_port()),  # its ClientApp runtime API, on loopback
                "--isolation",
                "subprocess",
                "--node-config",
                str(node_config),
            ],
        )

    def kill_supernode(self, site: str) -> None:
        """Kill the SuperNode of ``site`` and its ClientApp processes at once (SIGKILL), as a crash would."""
        self._stop(self.processes.pop(f"supernode-{site}"), signal.SIGKILL, grace=10)

    def write_app(self, config: Mapping[str, Any]) -> Path:
        app_dir = self.workdir / "app"
        app_dir.mkdir(exist_ok=True)
        (app_dir / "pyproject.toml").write_text(app_pyproject(config))
        return app_dir

    def run(
        self, config: Mapping[str, Any], *, timeout: float = 900.0, echo: bool = False
    ) -> subprocess.CompletedProcess:
        """Submit a run of scinfl's apps with run config ``config`` (:func:`run_config`); follow it until it
        ends (``flwr run --stream``).

        The output is returned, written to ``flwr-run.log`` and, with ``echo``, printed as it comes.
        Raises ``subprocess.TimeoutExpired`` (after stopping ``flwr run``) after ``timeout`` seconds.
        """
        app_dir = self.write_app(config)
        command = [str(Path(sys.executable).parent / "flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        logger.info("Running %s", shlex.join(command))
        lines: list[str] = []
        with open(self.workdir / "flwr-run.log", "a") as log:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,
                text=True,
                errors="replace",
            )

            def follow() -> None:  # in a thread, so that the deadline below holds while it reads
                for line in process.stdout:
                    lines.append(line)
                    log.write(line)
                    if echo:
                        print(line, end="", flush=True)

            reader = threading.Thread(target=follow, daemon=True)
            reader.start()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._stop(process, signal.SIGTERM)
                raise
            finally:
                reader.join(timeout=10)
        return subprocess.CompletedProcess(command, process.returncode, "".join(lines))

    @staticmethod
    def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Signal the process's whole group, reap the process, then SIGKILL whatever of the group is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        # Children that outlived their parent, or a parent that ignored the signal.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)

    def close(self) -> None:
        """Stop every process this deployment started (SuperNodes first, then the SuperLink), and those
        its processes started in sessions of their own: the SuperExec runs each ServerApp detached, so
        after a SuperLink crash the ServerApp would outlive it. They are found by this deployment's
        private ``FLWR_HOME`` in their environment."""
        for name in sorted(self.processes, key=lambda n: n == "superlink"):
            self._stop(self.processes[name])
        self.processes.clear()
        for pid in _processes_with_environment("FLWR_HOME", self.env["FLWR_HOME"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values()]

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


def _processes_with_environment(name: str, value: str) -> list[int]:
    """This user's processes (Linux ``/proc``) whose environment sets ``name=value``."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if entry.stat().st_uid != os.getuid() or int(entry.name) == os.getpid():
                continue
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue  # gone, or not ours to read
    return found


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log, for error messages."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_local_deployment(
    data_paths: Sequence[str | os.PathLike[str]],
    *,
    key_path: str | os.PathLike[str] | None,
    output_dir: str | os.PathLike[str],
    settings: Mapping[str, Any] | None = None,
    fields: Mapping[str, Any] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    timeout: float = 3600.0,
    tls: bool | Mapping[str, str | os.PathLike[str]] = True,
    authenticate: bool | None = None,
    supernode_keys: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Train scinfl's apps across a local deployment (one SuperNode per file); return the model's path.

    Each site is named after its file (``a.h5ad`` -> ``a``; an ``.h5mu`` file is a multi-omics site) and
    reads the key file through its own node config; the run config gets the key's fingerprint only. Every
    process started is stopped before this returns, also on errors and Ctrl-C.

    Parameters
    ----------
    data_paths
        One .h5ad (or .h5mu) per site.
    key_path
        The consortium's key file (:meth:`scinfl.FederationKey.save`), or None for plain FedAvg.
    output_dir
        Where the ServerApp writes its checkpoint and the model (``<output_dir>/model``).
    settings
        The run's settings as run-config entries (:meth:`~scinfl.federation.RunSpec.to_run_config`), e.g.
        ``{"task.name": "embedding", "task.n-latent": 32, "rounds": 10, "fit.lr": 0.01}``; the sites and
        the key's fingerprint are filled in here. Default: a classification with the defaults.
    fields
        The sites' data fields, where their files do not register them (:func:`scinfl.pp.register_site`):
        ``label_key``, ``layer``, ``use_raw``, ``modality``; each SuperNode gets them in its node config.
    workdir
        Logs, ``FLWR_HOME`` and the generated Flower App; None: ``<output_dir>/flower``.
    resume
        Continue the run checkpointed in ``output_dir``.
    timeout
        Seconds the whole run may take.
    tls
        Encrypt the connections with a certificate authority of the deployment's own (the default), or
        with the certificates named (``ca``, ``certificate``, ``private_key``); ``False``: ``--insecure``,
        traffic in the clear.
    authenticate
        Let in only the SuperNodes whose key pair is registered; default: with TLS (:class:`LocalDeployment`).
    supernode_keys
        Site -> its SuperNode's private key file; default: a key pair made for this deployment.
    """
    from .key import FederationKey

    paths = [Path(p).expanduser().absolute() for p in data_paths]
    names = [p.stem for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"Site files must have distinct names (a site is named after its file): {names}.")
    key = None if key_path is None else FederationKey.load(key_path)
    output_dir = Path(output_dir).expanduser().absolute()
    run_spec = RunSpec.from_run_config(
        {
            "task.name": "classification",
            **dict(settings or {}),
            "sites": ",".join(names),
            "key-fingerprint": "" if key is None else key.fingerprint,
            "scheme": "" if key is None else key.scheme,
        }
    )
    del key  # only its public fingerprint and scheme go into the run
    # Every input is checked before any process starts: a SuperNode that cannot read its file would
    # otherwise surface only as a site that never joined, minutes later.
    for name, path in zip(names, paths, strict=True):
        check_site_file(path, name)
    if not resume and checkpoint_path(output_dir).exists():
        raise FileExistsError(
            f"{output_dir} holds an earlier run's checkpoint ({checkpoint_path(output_dir).name}): pass "
            "resume=True to continue it, or choose another output directory."
        )
    if resume and not checkpoint_path(output_dir).exists():
        raise FileNotFoundError(f"resume=True, but {output_dir} holds no checkpoint to continue from.")
    node_fields = {
        name.replace("_", "-"): value
        for name, value in dict(fields or {}).items()
        if value not in (None, False, "")
    }
    nodes = {
        name: {"data-path": str(path), **node_fields}
        | ({} if key_path is None else {"key-path": str(Path(key_path).absolute())})
        for name, path in zip(names, paths, strict=True)
    }
    workdir = Path(workdir) if workdir is not None else output_dir / "flower"
    started = time.time()
    with LocalDeployment(
        workdir, nodes, tls=tls, authenticate=authenticate, supernode_keys=supernode_keys
    ) as deployment:
        logger.info(
            "SuperLink on 127.0.0.1:%d, %d SuperNodes; logs in %s.", deployment.port, len(nodes), workdir
        )
        completed = deployment.run(
            run_config(run_spec, output_dir, resume=resume), timeout=timeout, echo=True
        )
    model = output_dir / MODEL_DIR
    written = (model / "model.json").stat().st_mtime if (model / "model.json").is_file() else None
    # flwr run exits 0 even when the ServerApp was killed: only a model written by this run is success
    if completed.returncode != 0 or written is None or written < started:
        stale = "" if written is None else f"; {model} is an earlier run's"
        raise RuntimeError(
            f"The Flower run did not produce a model (flwr run exited with {completed.returncode}{stale}): "
            "the ServerApp failed or was killed. Resume from the last checkpoint with resume=True "
            f"(scinfl flower-local --resume). Its output ends with:\n{log_tail(workdir / 'flwr-run.log')}"
        )
    return model
