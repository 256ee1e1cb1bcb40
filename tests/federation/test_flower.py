"""Flower: what crosses the wire (no key material), a wrong key version, and real loopback deployments.

The simulation's equality with the in-process engine for every task is in ``test_engines.py``. Here a
deployment (a SuperLink and one SuperNode per site as subprocesses on 127.0.0.1, scinfl's apps from
``scinfl.flower_apps``) trains a hardened perturbation model through a SuperNode crash and a resume, and equals the in-process
model bit for bit; tutorial 03 deploys a classifier the same way.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import os
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

import scinfl as si
from helpers import (
    FAST_TASK,
    assert_no_secret,
    assert_same_history,
    assert_same_weights,
    hardened_secrets,
    key_secrets,
    small_spec,
)
from scinfl.deployment import LocalDeployment, log_tail, run_config, site_nodes
from scinfl.federation import InProcess, RunSpec, federate
from scinfl.federation.checkpoint import CHECKPOINT, load_checkpoint
from scinfl.federation.flower.server import GridTransport
from scinfl.federation.flower.simulation import simulate
from scinfl.train import key_material

pytest.importorskip("flwr")
pytest.importorskip("ray")

pytestmark = pytest.mark.slow

RUN = {"task": FAST_TASK, "rounds": 2, "seed": 0}


class RecordingGrid:
    """A Grid that hands everything to Flower's and keeps the bytes of every message it sends or gets."""

    def __init__(self, grid, blobs: list[bytes]) -> None:
        self.grid = grid
        self.blobs = blobs

    def _record(self, message) -> None:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        # The serialised objects of the message and all its records: what goes over the wire.
        self.blobs.append(b"".join(obj.deflate() for obj in get_all_nested_objects(message).values()))

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        messages = list(messages)
        for message in messages:
            self._record(message)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            self._record(reply)
        return replies


def test_wrong_key_version_rejected_and_messages_hold_no_key_material(pbmc_split, scinfl_log):
    """A hardened run: every message (hello, the initial weights a site draws, the rounds) is recorded as
    it crosses the wire and searched for the key, its hex and its derived transforms; the model equals the
    in-process one."""
    from flwr.serverapp import ServerApp

    sites = pbmc_split[0]
    key = si.FederationKey(hashlib.sha256(b"wire key").digest(), scheme="hardened")
    stale = si.FederationKey.generate(scheme="hardened")
    keys = {"site_0": key, "site_1": key, "site_2": stale}
    spec = RunSpec(
        task=FAST_TASK,
        sites=tuple(sites),
        key_fingerprint=key.fingerprint,
        scheme="hardened",
        rounds=1,
        min_cohort=2,
    )
    blobs: list[bytes] = []
    runs = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        runs.append(federate(GridTransport(RecordingGrid(grid, blobs)), spec))

    torch.set_num_threads(1)
    simulate(sites, keys, spec, server_app=server_app)
    assert torch.get_num_threads() == 1  # the ServerApp's thread leaves the caller's count alone
    (run,) = runs
    assert run.history.set_index("site")["rejected"].to_dict() == {
        "site_0": False,
        "site_1": False,
        "site_2": True,
    }
    assert "left site 'site_2' out of the sum" in scinfl_log.text  # masked updates cannot be taken out
    assert stale.fingerprint in scinfl_log.text

    # hello (3 + 3), the initial weights from site_0 (1 + 1), round 1 (3 + 3), final evaluation (3 + 3)
    assert len(blobs) == 20
    wire = b"".join(blobs)
    # Positive controls: the search runs over the real payloads -- the fingerprints and the weights.
    assert key.fingerprint.encode() in wire
    assert stale.fingerprint.encode() in wire
    final_weight = next(t for n, t in run.final_state.items() if n.endswith("weight"))
    assert final_weight.numpy().tobytes() in wire
    network = si.tasks.build_network(run.config)
    # and the hardened classifier the simulation trained is the in-process one, bit for bit
    in_process = federate(InProcess(sites, keys), spec)
    for name, tensor in in_process.final_state.items():
        assert torch.equal(run.final_state[name], tensor), name
    assert_same_history(in_process.history, run.history)
    for k in (key, stale):
        assert_no_secret(wire, key_secrets(k) + hardened_secrets(key_material(k, network)))
    # Secure aggregation: no site's update crosses the wire, only masked vectors (the updates are those
    # of the same round in the clear, in process)
    clear = _InProcessUpdates(sites, keys)
    federate(clear, spec.replace(secure_aggregation=False))
    for site in ("site_0", "site_1"):
        for name, tensor in clear.updates[site].items():
            if tensor.is_floating_point() and tensor.numel() >= 16:
                assert tensor.reshape(-1)[:16].numpy().tobytes() not in wire, (site, name)


class _InProcessUpdates(InProcess):
    """In-process sites that keep each site's first update."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.updates: dict[str, dict] = {}

    def exchange(self, round_index, state, spec, config, instructions):
        replies = super().exchange(round_index, state, spec, config, instructions)
        for site, reply in replies.items():
            if reply.update is not None:
                self.updates.setdefault(site, reply.update.state)
        return replies


def test_unknown_engine_is_refused(pbmc_split):
    with pytest.raises(ValueError, match="Unknown engine"):
        si.tl.train_federated(pbmc_split[0], key=None, engine="grpc", **RUN)


def test_flower_processes_find_their_commands_and_a_failed_start_says_why(tmp_path, monkeypatch):
    """flower-superlink starts flower-superexec by name: the deployment puts this environment's bin
    directory on PATH, and when a process still cannot start, its error carries the cause from its log."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a virtual environment used without activating it
    deployment = LocalDeployment(tmp_path / "flower", {})
    assert deployment.env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    deployment.env["PATH"] = str(tmp_path / "nothing")  # now flower-superexec cannot be found
    try:
        with pytest.raises(
            RuntimeError, match=r"(?s)flower-superlink exited with code \d+ while starting.*flower-superexec"
        ):
            deployment.start()
    finally:
        deployment.close()


def test_a_site_that_cannot_join_names_itself_and_the_cause(tmp_path, monkeypatch):
    """A SuperNode whose data file is missing answers the hello with its site's name and the error, so
    the ServerApp logs the site, not only a node ID."""
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from scinfl.federation.flower import protocol
    from scinfl.federation.flower.client import make_client_app

    for name in ("_run_id", "_node_id", "_task_id"):  # what a ClientApp process is given by Flower
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)
    spec = RunSpec(task=FAST_TASK, sites=("ucsf", "charite", "kcl"))
    missing = tmp_path / "ucsf.h5ad"
    app = make_client_app(lambda context: {"site": "ucsf", "data-path": str(missing)})
    hello = Message(
        RecordDict({protocol.SITE: protocol.run_record(spec)}), dst_node_id=7, message_type=protocol.HELLO
    )
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = app(hello, context)
    assert not reply.has_error()
    site, failure = protocol.decode_hello(reply.content)
    assert site == "ucsf"
    assert failure == f"FileNotFoundError: Site 'ucsf': no data file at {missing}."


def test_a_killed_simulation_leaves_no_key_behind_once_the_next_one_starts(
    pbmc, tmp_path, monkeypatch, scinfl_log
):
    """A process SIGKILLed during engine="flower" cannot remove its workspace (key files, site data): the
    next workspace removes those of processes that are gone, and keeps those of live ones."""
    import stat
    import subprocess
    import tempfile

    from scinfl.federation.flower.simulation import private_workspace, write_site

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    orphan = tmp_path / f"scinfl-flower-{int(finished.stdout)}-x1"  # the workspace of a killed run
    orphan.mkdir()
    si.FederationKey.generate().save(orphan / "consortium.key")
    running = tmp_path / f"scinfl-flower-{os.getpid()}-x2"  # another run of a live process
    running.mkdir()
    with private_workspace() as workspace:
        assert workspace.parent == tmp_path
        assert workspace.name.startswith(f"scinfl-flower-{os.getpid()}-")
        assert stat.S_IMODE(workspace.stat().st_mode) == 0o700
        written = write_site(pbmc, FAST_TASK, "site_0", workspace / "site_0")
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert not orphan.exists()
    assert running.exists()
    assert not workspace.exists()
    assert "whose process was killed (they held key files)" in scinfl_log.text


def test_a_run_whose_serverapp_died_is_not_reported_as_done(tmp_path, monkeypatch):
    """``flwr run`` exits 0 when its ServerApp is killed: only a model this run wrote counts, not none and
    not an earlier run's."""
    import subprocess

    from scinfl import deployment

    class EndsWithoutModel:  # a deployment whose ServerApp died: flwr run still exits 0
        port = 0

        def __init__(self, workdir, nodes, **options) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def run(self, config, **options):
            return subprocess.CompletedProcess(["flwr", "run"], 0, stdout="")

    monkeypatch.setattr(deployment, "LocalDeployment", EndsWithoutModel)
    files = [tmp_path / f"{name}.h5ad" for name in ("a", "b", "c")]
    for file in files:  # checked before any process starts: real, if tiny, site files
        ad.AnnData(np.zeros((2, 3), dtype=np.float32)).write_h5ad(file)
    output = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"did not produce a model \(flwr run exited with 0\).*--resume"):
        deployment.run_local_deployment(files, key_path=None, output_dir=output)
    earlier = output / "model" / "model.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    os.utime(earlier, (1, 1))  # an earlier run's model
    with pytest.raises(RuntimeError, match=r"exited with 0; .* is an earlier run's"):
        deployment.run_local_deployment(files, key_path=None, output_dir=output)


def test_the_grid_transport_takes_back_a_restarted_supernode(pbmc, tmp_path, monkeypatch):
    """Before each round the ServerApp looks for dropped sites. A SuperNode restarted without authentication
    registers with a new node ID: new nodes are asked which site they serve, once. An authenticated one keeps
    its node ID: a dropped site's own node is asked while it is listed, without waiting (it may be dead but
    still listed), and its answer is read before the next round."""
    from types import SimpleNamespace

    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from scinfl.federation.flower.client import make_client_app
    from scinfl.federation.identity import write_consortium

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)
    path = tmp_path / "site_1.h5ad"
    pbmc.write_h5ad(path)
    identity = write_consortium(tmp_path / "identities", ["site_0", "site_1", "site_2"])["site_1"]
    app = make_client_app(
        lambda context: {"site": "site_1", "data-path": str(path), "use-raw": True, **identity}
    )

    class Grid:  # node 3 serves site_0; node 7 served site_1 and died
        def __init__(self, nodes: list[int]) -> None:
            self.nodes, self.pushed, self.replies = nodes, [], []

        def get_node_ids(self):
            return list(self.nodes)

        def push_messages(self, messages):
            messages = list(messages)
            self.pushed += [m.metadata.dst_node_id for m in messages]
            self.replies += [  # the SuperNode of site_1 answers, whichever node id it has
                SimpleNamespace(
                    metadata=SimpleNamespace(reply_to_message_id=f"m{m.metadata.dst_node_id}"),
                    content=app(m, Context(1, 9, {}, RecordDict(), {})).content,
                    has_error=lambda: False,
                )
                for m in messages
            ]
            return [f"m{m.metadata.dst_node_id}" for m in messages]

        def pull_messages(self, ids):
            pulled = [r for r in self.replies if r.metadata.reply_to_message_id in ids]
            self.replies = [r for r in self.replies if r not in pulled]
            return pulled

    spec = RunSpec(task=FAST_TASK, sites=("site_0", "site_1", "site_2"))

    def transport_of(grid: Grid) -> GridTransport:
        transport = GridTransport(grid)
        transport.nodes, transport.asked = {"site_0": 3, "site_1": 7}, {3, 7}
        return transport

    # Restarted without authentication: node 7 is gone, node 9 appears.
    grid = Grid([3])
    transport = transport_of(grid)
    assert transport.rejoin(spec, ["site_1"]) == {}  # nothing new and node 7 not listed: nothing waits
    assert grid.pushed == []
    grid.nodes.append(9)
    back = transport.rejoin(spec, ["site_1"])
    assert list(back) == ["site_1"]
    assert back["site_1"].description["n_obs"] == pbmc.n_obs
    assert back["site_1"].masking_key is not None  # a new masking key for the rest of the run
    assert transport.nodes["site_1"] == 9
    assert grid.pushed == [9]
    transport.rejoin(spec, [])
    assert grid.pushed == [9]  # asked once
    assert transport.dropped == {}  # its old node is forgotten once the site is back

    # Restarted with authentication: node 7 is listed again (or still), under the same id.
    grid = Grid([3, 7])
    transport = transport_of(grid)
    assert transport.rejoin(spec, ["site_1"]) == {}  # asked, not awaited
    assert grid.pushed == [7]
    back = transport.rejoin(spec, ["site_1"])  # the answer is read before the next round
    assert list(back) == ["site_1"]
    assert transport.nodes["site_1"] == 7
    assert grid.pushed == [7]
    assert transport.dropped == {}


def test_close_stops_what_the_deployment_started_in_other_sessions(tmp_path):
    """The SuperExec starts each ServerApp in a session of its own: after a SuperLink crash it would
    outlive the deployment. close() finds such processes by the deployment's FLWR_HOME and stops them."""
    import subprocess

    deployment = LocalDeployment(tmp_path / "flower", {})
    orphan = subprocess.Popen(  # as a detached ServerApp: its own session, the deployment's environment
        [sys.executable, "-c", "import time; time.sleep(120)"], env=deployment.env, start_new_session=True
    )
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        deployment.close()
        assert orphan.wait(timeout=10) == -9
        assert bystander.poll() is None  # not the deployment's
    finally:
        for process in (orphan, bystander):
            process.kill()
            process.wait()


def test_a_local_deployment_lets_in_only_registered_supernodes_that_verify_its_certificate(tmp_path):
    """TLS and SuperNode authentication by default: the deployment's own CA signs the SuperLink's
    certificate, and the SuperLink lets in only SuperNodes whose public key was registered. Of four
    SuperNodes started together, only the one that verifies the certificate and signs with a registered key
    goes online; one in the clear (--insecure), one with an unregistered key and one with no key do not.
    (The deployment test below trains with both.)"""
    import json
    import stat
    import subprocess

    from scinfl.deployment import CONNECTION, free_port, write_supernode_key

    bin_dir = Path(sys.executable).parent
    deployment = LocalDeployment(tmp_path / "flower", {})
    assert deployment.tls is not None
    assert deployment.authenticate
    assert stat.S_IMODE(deployment.tls["private_key"].stat().st_mode) == 0o600
    registered_key = write_supernode_key(tmp_path / "keys" / "registered.key")
    stranger_key = write_supernode_key(tmp_path / "keys" / "stranger.key")
    assert stat.S_IMODE(registered_key["private_key"].stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="Site 'x'.*not a SuperNode key"):  # a certificate is not a key
        deployment.register_supernodes({"x": deployment.tls["ca"]})
    supernodes = []

    def listed() -> list[dict]:
        shown = subprocess.run(
            [str(bin_dir / "flwr"), "supernode", "list", CONNECTION, "--format", "json"],
            env=deployment.env,
            cwd=deployment.workdir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return json.loads(shown.stdout)["nodes"]

    try:
        deployment.start()
        node_id = deployment.register_supernodes({"registered": registered_key["private_key"]})["registered"]
        verify = ["--root-certificates", str(deployment.tls["ca"])]
        for flags in (
            ["--insecure"],
            [*verify, "--auth-supernode-private-key", str(registered_key["private_key"])],
            [*verify, "--auth-supernode-private-key", str(stranger_key["private_key"])],
            verify,
        ):
            supernodes.append(
                subprocess.Popen(
                    [
                        str(bin_dir / "flower-supernode"),
                        *flags,
                        *("--superlink", f"127.0.0.1:{deployment.port}", "--port", str(free_port())),
                    ],
                    env=deployment.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 30
        while not any(node["status"] == "online" for node in listed()) and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(2)  # the others have had as long, and more, to get in
        assert [(int(node["node-id"]), node["status"]) for node in listed()] == [(node_id, "online")]
    finally:
        for supernode in supernodes:
            supernode.kill()
            supernode.wait()
        deployment.close()
    with pytest.raises(ValueError, match="needs TLS"):
        LocalDeployment(tmp_path / "clear", {}, tls=False, authenticate=True)
    with pytest.raises(ValueError, match=r"not in the deployment: \['x'\]"):
        LocalDeployment(tmp_path / "typo", {"a": {}}, supernode_keys={"x": registered_key["private_key"]})
    with pytest.raises(ValueError, match="authentication is off"):
        LocalDeployment(tmp_path / "off", {"a": {}}, authenticate=False, supernode_keys={"a": "a.key"})


def _alive(process_groups: list[int]) -> list[str]:
    """Processes (other than zombies) still in any of these process groups."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (command) "
        state, pgid = fields[0], int(fields[2])
        if pgid in process_groups and state != "Z":
            alive.append(stat[: stat.rindex(")") + 1])
    return alive


def _wait_for_checkpoint(output_dir: Path, round_index: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (output_dir / CHECKPOINT).is_file() and load_checkpoint(output_dir)["round"] >= round_index:
            return
        time.sleep(0.2)
    raise TimeoutError(f"No checkpoint of round {round_index} after {timeout} s.")


def _arguments_of(deployment: LocalDeployment) -> bytes:
    """The command lines of every process of the deployment (all carry its FLWR_HOME)."""
    from scinfl.deployment import _processes_with_environment

    arguments = []
    for pid in _processes_with_environment("FLWR_HOME", deployment.env["FLWR_HOME"]):
        try:
            arguments.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:  # ended meanwhile
            continue
    return b"\n".join(arguments)


def _assert_all_stopped(groups: list[int]) -> None:
    deadline = time.monotonic() + 15
    while _alive(groups) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(groups)


def test_deployed_hardened_perturbation_run_survives_a_killed_supernode_and_equals_in_process(pbmc, tmp_path):
    """A SuperLink and two SuperNodes as subprocesses on loopback ports train a perturbation model under a
    hardened key: a site draws its first weights (only a key holder can), and each site builds its control
    profiles where its data is. One SuperNode is killed after round 1: the run stops with a clear error
    instead of hanging; restarted, it resumes from the checkpoint, and the model equals the in-process
    run's bit for bit. (A classifier is deployed by tutorial 03, which the suite executes.)"""
    key = si.FederationKey(hashlib.sha256(b"deployed perturbation").digest(), scheme="hardened")
    sites = si.pp.split_sites(pbmc, n_sites=2, label_key="bulk_labels", alpha=5.0, seed=0)
    for site in sites.values():
        site.obs["guide"] = site.obs["louvain"].astype(str)
    task = si.tasks.Perturbation(perturbation_key="guide", control="0", covariate_keys=("phase",), hidden=32)
    key_path = key.save(tmp_path / "consortium.key")
    output_dir = tmp_path / "run"
    spec = RunSpec(
        task=task,
        sites=tuple(sites),
        key_fingerprint=key.fingerprint,
        scheme="hardened",
        rounds=2,
        seed=1,
        # A ClientApp process per message takes 6-10 s (imports, data, a fit) on 2 busy cores; the run waits
        # this long for the killed site before it stops, so the deadline is 3x that, not more.
        round_timeout=30,
        connect_timeout=120,
        min_cohort=2,  # masked updates: each SuperNode keeps its masking key in its run context
    )
    # TLS, without SuperNode authentication: a restarted authenticated node must wait until its crashed
    # predecessor's heartbeats lapse (about a minute), which the authentication tests cover.
    deployment = LocalDeployment(
        tmp_path / "flower", site_nodes(sites, tmp_path, key_path), authenticate=False
    )
    groups: list[int] = []
    try:
        deployment.start()
        groups += deployment.pids()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(deployment.run, run_config(spec, output_dir), timeout=300)
            _wait_for_checkpoint(output_dir, 1, timeout=240)
            # No secret in any process's arguments (readable by every user of the machine)
            arguments = _arguments_of(deployment)
            assert b"flower-supernode" in arguments  # the deployment's processes were read
            assert_no_secret(
                arguments,
                [*key_secrets(key), base64.b64encode(key._secret), base64.urlsafe_b64encode(key._secret)],
            )
            deployment.kill_supernode("site_1")
            started = time.monotonic()
            failed = first.result()  # returns: the run must not hang on the dead site
        assert time.monotonic() - started < spec.round_timeout + 60
        assert "1 site(s) answered" in failed.stdout, failed.stdout[-3000:]
        assert "min-sites" in failed.stdout
        assert load_checkpoint(output_dir)["round"] == 1
        assert not (output_dir / "model").exists()

        groups.append(deployment.start_supernode("site_1").pid)
        resumed = deployment.run(run_config(spec, output_dir, resume=True), timeout=300)
        assert "Resuming from the checkpoint of round 1" in resumed.stdout, resumed.stdout[-3000:]
    finally:
        deployment.close()
    _assert_all_stopped(groups)  # every process started, and every process they started, is gone

    assert (output_dir / "model" / "model.json").is_file(), log_tail(tmp_path / "flower" / "flwr-run.log")
    deployed = si.FederatedModel.load(output_dir / "model")
    local = si.tl.train_federated(
        sites, key=key, task=task, rounds=2, seed=1, copy=True, secure_aggregation={"min_cohort": 2}
    )
    assert deployed.task == task
    assert deployed.params["engine"] == "flower"
    assert deployed.spec == local.spec.replace(round_timeout=30, connect_timeout=120)
    assert_same_weights(local, deployed)
    assert_same_history(local.history, deployed.history)
    query = sites["site_1"].copy()
    predicted = deployed.predict(query, key=key).expression
    np.testing.assert_array_equal(predicted, local.predict(query, key=key).expression)
    # the saved model never holds the key, nor what the hardened scheme derives from it
    saved = b"".join(p.read_bytes() for p in (output_dir / "model").iterdir())
    assert_no_secret(saved, [*key_secrets(key), *hardened_secrets(key_material(key, deployed.network))])


@pytest.mark.skipif(
    os.environ.get("SCINFL_LONG_TESTS") != "1",
    reason="about 4 minutes (a crashed node's heartbeats must lapse); SCINFL_LONG_TESTS=1 runs it",
)
def test_an_authenticated_supernode_killed_mid_run_rejoins_under_its_node_id(pbmc, tmp_path):
    """Three sites under SuperNode authentication; one SuperNode is killed after round 1 and restarted. The
    restart waits until the SuperLink has marked its node offline (Flower refuses to activate a node that
    still counts as online); the site drops, the round completes from the other two, and the restarted
    node, under its old ID, is asked again and contributes to the rounds after."""
    key = si.FederationKey(hashlib.sha256(b"rejoin").digest(), scheme="hardened")
    sites = si.pp.split_sites(pbmc, n_sites=3, label_key="bulk_labels", alpha=5.0, seed=0)
    key_path = key.save(tmp_path / "consortium.key")
    spec = small_spec(
        sites, key, rounds=5, seed=0, round_timeout=60, connect_timeout=120, min_sites=2, min_cohort=2
    )
    output_dir = tmp_path / "run"
    deployment = LocalDeployment(tmp_path / "flower", site_nodes(sites, tmp_path, key_path))
    try:
        deployment.start()
        node_id = deployment.node_ids["site_2"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(deployment.run, run_config(spec, output_dir), timeout=600)
            _wait_for_checkpoint(output_dir, 1, timeout=240)
            deployment.kill_supernode("site_2")
            deployment.start_supernode("site_2")  # waits for the node to go offline
            completed = running.result()
        assert deployment.node_status()[node_id] == "online"  # the same node, back
    finally:
        deployment.close()
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert "site 'site_2' dropped from the run" in completed.stdout
    assert "site 'site_2' rejoined the run" in completed.stdout
    history = si.FederatedModel.load(output_dir / "model").history
    rounds_of_site_2 = sorted(history.loc[history.site == "site_2", "round"])
    assert rounds_of_site_2[0] == 1
    assert rounds_of_site_2[-1] == spec.rounds  # back for the last rounds
    assert len(rounds_of_site_2) < spec.rounds  # and away for at least one


def test_flwr_json_output_is_read_also_when_styled():
    """Under a Jupyter kernel (FORCE_COLOR=1) flwr styles its JSON output with ANSI escapes."""
    from scinfl.deployment import _json_output

    styled = '\x1b[1m{\x1b[0m\n  \x1b[1;34m"success"\x1b[0m: \x1b[3;92mtrue\x1b[0m,\n  \x1b[1;34m"node-id"\x1b[0m: \x1b[1;36m157\x1b[0m\n\x1b[1m}\x1b[0m\n'
    assert _json_output(styled) == {"success": True, "node-id": 157}
    assert _json_output('Loading...\n{"nodes": []}') == {"nodes": []}
