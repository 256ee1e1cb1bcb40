"""engine="flower": Flower's simulation runtime and a real loopback deployment against the in-process engine.

Tolerance: the Flower engine runs the same site code on the same weights (ArrayRecords carry float32
exactly) with one torch thread per process, so the weights and metrics are expected to be bit-identical
to ``engine="local"``; the tests compare weights exactly and metrics to 1e-6.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

import scinfl as si
from scinfl.data import site_fields
from scinfl.federation.checkpoint import CHECKPOINT, load_checkpoint
from scinfl.federation.flower.deployment import LocalDeployment, log_tail
from scinfl.federation.flower.protocol import RunSettings
from scinfl.federation.flower.server import run_server
from scinfl.federation.flower.simulation import simulate

FLOWER_FAST = {"label_key": "bulk_labels", "use_raw": True, "rounds": 2, "hidden": 64, "seed": 0}
METRIC_TOLERANCE = {"rtol": 1e-6, "atol": 1e-9}


def _accuracy(model: si.FederatedModel, held_out, key) -> float:
    query = held_out.copy()
    si.tl.predict(query, model, key=key)
    return float((query.obs["scinfl_prediction"].astype(str) == query.obs["bulk_labels"].astype(str)).mean())


def _assert_same_weights(a: si.FederatedModel, b: si.FederatedModel) -> None:
    state_a, state_b = a.network.state_dict(), b.network.state_dict()
    assert list(state_a) == list(state_b)
    for name, tensor in state_a.items():
        torch.testing.assert_close(state_b[name], tensor, rtol=0, atol=0, msg=f"weights differ at {name}")


def _assert_same_history(local: pd.DataFrame, flower: pd.DataFrame) -> None:
    assert set(local.columns) == set(flower.columns)
    flower = flower[local.columns]
    pd.testing.assert_frame_equal(local, flower, check_exact=False, **METRIC_TOLERANCE)


def key_material(key: si.FederationKey) -> list[bytes]:
    """Bytes that would betray the key: the secret, its hex, and the coordinates derived from it."""
    coordinates = key.coordinates()
    return [
        key._secret,
        key._secret.hex().encode(),
        key._secret.hex().upper().encode(),
        coordinates.tobytes(),
        coordinates[:2].tobytes(),
        coordinates[-2:].astype(np.float64).tobytes(),
    ]


@pytest.mark.parametrize("scheme", ["infl", "hardened"])
def test_simulation_matches_in_process_engine(pbmc_split, key, scheme):
    sites, held_out = pbmc_split
    if scheme == "hardened":  # its sites train in the plain basis and convert the weights every round
        key = si.FederationKey(hashlib.sha256(b"flower hardened key").digest(), scheme="hardened")
    local, local_sites = si.tl.train_federated(sites, key=key, engine="local", copy=True, **FLOWER_FAST)
    flower, flower_sites = si.tl.train_federated(sites, key=key, engine="flower", copy=True, **FLOWER_FAST)
    assert flower.params["engine"] == "flower"
    assert flower.params["best_round"] == local.params["best_round"]
    _assert_same_history(local.history, flower.history)
    assert len(flower.history) == 3 * FLOWER_FAST["rounds"]
    _assert_same_weights(local, flower)
    for name in sites:  # and what was written into each site
        np.testing.assert_allclose(
            flower_sites[name].obsm["scinfl_probabilities"], local_sites[name].obsm["scinfl_probabilities"]
        )
    assert _accuracy(flower, held_out, key) == pytest.approx(_accuracy(local, held_out, key), abs=1e-6)


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


def test_wrong_key_version_rejected_and_messages_hold_no_key_material(pbmc_split, key, scinfl_log):
    from flwr.serverapp import ServerApp

    sites = pbmc_split[0]
    stale = si.FederationKey.generate(scheme="infl")
    keys = {"site_0": key, "site_1": key, "site_2": stale}
    settings = RunSettings(
        sites=tuple(sites),
        key_fingerprint=key.fingerprint,
        scheme=key.scheme,
        label_key="bulk_labels",
        rounds=1,
        hidden=64,
    )
    blobs: list[bytes] = []
    runs = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        runs.append(run_server(RecordingGrid(grid, blobs), settings))

    fields = {n: site_fields(a, n, label_key="bulk_labels", use_raw=True) for n, a in sites.items()}
    simulate(sites, fields, keys, settings, server_app=server_app)
    (run,) = runs
    history = run.result.history
    assert history.set_index("site")["rejected"].to_dict() == {
        "site_0": False,
        "site_1": False,
        "site_2": True,
    }
    assert "rejected the update of site 'site_2'" in scinfl_log.text
    assert stale.fingerprint in scinfl_log.text

    # hello (3 + 3), round 1 (3 + 3), final evaluation (3 + 3)
    assert len(blobs) == 18
    wire = b"".join(blobs)
    # Positive controls: the search runs over the real payloads -- the fingerprints and the weights.
    assert key.fingerprint.encode() in wire
    assert stale.fingerprint.encode() in wire
    final_weight = next(t for n, t in run.result.final_state.items() if n.endswith("weight"))
    assert final_weight.numpy().tobytes() in wire
    for secret in key_material(key) + key_material(stale):
        assert secret not in wire


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


def test_deployment_survives_a_killed_supernode_by_resuming_and_matches_in_process(pbmc_split, key, tmp_path):
    """A SuperLink and two SuperNodes as subprocesses on loopback ports: kill one SuperNode after round 1,
    the run stops with a clear error instead of hanging; restart it, resume from the checkpoint, and the
    model equals the in-process run's."""
    import concurrent.futures

    sites = {name: pbmc_split[0][name] for name in ("site_0", "site_1")}
    held_out = pbmc_split[1]
    key_path = key.save(tmp_path / "consortium.key")
    nodes = {}
    for name, adata in sites.items():
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
        nodes[name] = {"data-path": str(tmp_path / f"{name}.h5ad"), "key-path": str(key_path)}
    output_dir = tmp_path / "run"
    settings = RunSettings(
        sites=tuple(sites),
        key_fingerprint=key.fingerprint,
        scheme=key.scheme,
        output_dir=str(output_dir),
        label_key="bulk_labels",
        use_raw=True,
        rounds=FLOWER_FAST["rounds"],
        hidden=FLOWER_FAST["hidden"],
        seed=FLOWER_FAST["seed"],
        round_timeout=35,
        connect_timeout=90,
    )
    deployment = LocalDeployment(tmp_path / "flower", nodes)
    groups: list[int] = []
    try:
        deployment.start()
        groups += deployment.pids()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(deployment.run, settings, timeout=300)
            _wait_for_checkpoint(output_dir, 1, timeout=240)
            deployment.kill_supernode("site_1")
            started = time.monotonic()
            failed = first.result()  # returns: the run must not hang on the dead site
        assert time.monotonic() - started < settings.round_timeout + 60
        assert "1 site(s) answered" in failed.stdout, failed.stdout[-3000:]
        assert "min-sites" in failed.stdout
        assert load_checkpoint(output_dir)["round"] == 1
        assert not (output_dir / "model").exists()

        groups.append(deployment.start_supernode("site_1").pid)
        resumed = deployment.run(dataclasses.replace(settings, resume=True), timeout=300)
        assert "Resuming from the checkpoint of round 1" in resumed.stdout, resumed.stdout[-3000:]
    finally:
        deployment.close()
    # every process started, and every process they started, is gone
    deadline = time.monotonic() + 15
    while _alive(groups) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(groups)

    assert (output_dir / "model" / "model.json").is_file(), log_tail(tmp_path / "flower" / "flwr-run.log")
    deployed = si.FederatedModel.load(output_dir / "model")
    local = si.tl.train_federated(sites, key=key, engine="local", copy=True, **FLOWER_FAST)[0]
    _assert_same_weights(local, deployed)
    assert _accuracy(deployed, held_out, key) == pytest.approx(_accuracy(local, held_out, key), abs=1e-6)
    _assert_same_history(local.history, deployed.history)
    # the saved model never holds the key
    saved = b"".join(p.read_bytes() for p in (output_dir / "model").iterdir())
    for secret in key_material(key):
        assert secret not in saved


def test_simulation_rejects_dp_and_needs_known_engine(pbmc_split, key):
    sites = pbmc_split[0]
    with pytest.raises(ValueError, match="engine='local' only"):
        si.tl.train_federated(sites, key=None, engine="flower", dp={"epsilon": 8.0}, copy=True, **FLOWER_FAST)
    with pytest.raises(ValueError, match="Unknown engine"):
        si.tl.train_federated(sites, key=key, engine="grpc", copy=True, **FLOWER_FAST)


def test_run_settings_round_trip_the_run_config():
    settings = RunSettings(sites=("a", "b"), key_fingerprint="00ff", scheme="infl", rounds=3, use_raw=True)
    assert RunSettings.from_run_config(settings.to_run_config()) == settings
    with pytest.raises(ValueError, match="Unknown scinfl run-config keys"):
        RunSettings.from_run_config({"sites": "a", "key": "secret"})
    with pytest.raises(ValueError, match="both key-fingerprint and scheme"):
        RunSettings(sites=("a",), key_fingerprint="00ff")
    with pytest.raises(ValueError, match="min-sites"):
        RunSettings(sites=("a",), min_sites=2)
