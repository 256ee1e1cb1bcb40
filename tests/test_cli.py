"""`scinfl demo` from a shell, with small settings; `scinfl flower-local`'s arguments as the run it starts;
what the commands refuse, as one line with the flag to use."""

from __future__ import annotations

import os
import subprocess
import sys

import anndata as ad
import pytest
import scanpy as sc

import scinfl as si
from scinfl import cli, deployment
from scinfl.federation import RunSpec
from scinfl.federation.checkpoint import checkpoint_path


def test_demo_runs_from_the_shell(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scinfl",
            "demo",
            "--rounds",
            "2",
            "--seeds",
            "1",
            "--wrong-keys",
            "2",
            "--hidden",
            "32",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    for row in (
        "centralised",
        "each site alone",
        "plain FedAvg",
        "INFL (paper), right key",
        "hardened, right key",
        "wrong keys",
        "no key",
        "chance",
    ):
        assert row in out
    written = ad.read_h5ad(tmp_path / "scinfl_demo.h5ad")
    assert written.n_obs == 142  # the stratified 20% test set of 700 cells
    assert {"scinfl_prediction", "scinfl_fedavg_prediction"} <= set(written.obs)
    assert written.obsm["X_scinfl"].shape == (142, 16)
    assert (tmp_path / "scinfl_demo_history.png").stat().st_size > 1000


def test_cli_usage_error():
    result = subprocess.run([sys.executable, "-m", "scinfl"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "demo" in result.stderr


def test_demo_help_reads_as_written(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "a 20% held-out test set" in text
    assert "%%" not in text


@pytest.fixture
def flower_local(monkeypatch, tmp_path):
    """``scinfl flower-local ARGS`` without a deployment: what it asks :func:`run_local_deployment` for."""
    calls = []

    def fake_deployment(paths, **options):
        calls.append((list(paths), options))
        return tmp_path / "model"

    monkeypatch.setattr(deployment, "run_local_deployment", fake_deployment)

    def run(*args: str):
        assert cli.main(["flower-local", "--sites", "a.h5ad", "b.h5ad", "c.h5ad", *args]) == 0
        assert len(calls) == 1
        paths, options = calls.pop()
        assert paths == ["a.h5ad", "b.h5ad", "c.h5ad"]
        # The settings are the run config the deployment reads (sites and key filled in there).
        spec = RunSpec.from_run_config({**options["settings"], "sites": "a,b,c"})
        return spec, options

    return run


@pytest.fixture
def refused(capsys):
    """``scinfl ARGS``'s one-line error (exit status 2); each refusal comes before any process starts."""

    def run(*args: str) -> str:
        assert cli.main(list(args)) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"scinfl {args[0]}: error: "), error
        assert error.count("\n") == 1, error  # one line, no traceback
        return error

    return run


def test_flower_local_defaults(flower_local, capsys):
    spec, options = flower_local()
    assert spec.task == si.tasks.Classification()
    assert (spec.rounds, spec.seed, spec.min_sites, spec.round_timeout) == (20, 0, 0, 600.0)
    assert (spec.secure_aggregation, spec.min_cohort) == (True, 3)
    assert (options["tls"], options["authenticate"]) == (True, True)
    assert options["key_path"] is None
    assert options["output_dir"] == "scinfl-flower"
    assert options["resume"] is False
    assert options["fields"] == {"layer": None, "use_raw": False, "modality": None}
    assert "load it with scinfl.FederatedModel.load" in capsys.readouterr().out


def test_flower_local_task_settings_and_site_fields(flower_local):
    spec, options = flower_local(
        "--task",
        "embedding",
        "--rounds",
        "3",
        "--seed",
        "7",
        "--min-sites",
        "1",
        "--layer",
        "counts",
        "--use-raw",
        "--modality",
        "rna",
        "--key",
        "k.key",
        "--resume",
        "--output-dir",
        "out",
        "--set",
        "task.n-latent=32",
        "task.likelihood=poisson",
        "task.hidden=64",
        "fit.lr=0.01",
        "fit.local-epochs=2",
        "validation-fraction=0.2",
    )
    assert spec.task == si.tasks.Embedding(n_latent=32, likelihood="poisson", hidden=64)
    assert (spec.rounds, spec.seed, spec.min_sites) == (3, 7, 1)
    assert (spec.fit.lr, spec.fit.local_epochs, spec.validation_fraction) == (0.01, 2, 0.2)
    assert options["fields"] == {"layer": "counts", "use_raw": True, "modality": "rna"}
    assert (options["key_path"], options["output_dir"], options["resume"]) == ("k.key", "out", True)


def test_flower_local_insecure_is_an_explicit_choice(flower_local):
    _, options = flower_local("--insecure")
    assert (options["tls"], options["authenticate"]) == (False, False)  # Flower's auth needs TLS
    _, options = flower_local("--no-supernode-auth")
    assert (options["tls"], options["authenticate"]) == (True, False)


def test_flower_local_takes_certificates_and_supernode_keys_by_path(flower_local, refused):
    _, options = flower_local(
        *("--tls-certificates", "ca.crt", "server.crt", "server.key"),
        *("--supernode-key", "a=a.key", "--supernode-key", "b=/k/b.key"),
    )
    assert options["tls"] == {"ca": "ca.crt", "certificate": "server.crt", "private_key": "server.key"}
    assert options["supernode_keys"] == {"a": "a.key", "b": "/k/b.key"}
    sites = ("flower-local", "--sites", "a.h5ad", "b.h5ad", "c.h5ad")
    assert "NAME=VALUE" in refused(*sites, "--supernode-key", "a.key")
    assert "exclude each other" in refused(*sites, "--insecure", "--tls-certificates", "ca", "crt", "key")


def test_flower_local_secure_aggregation_options(flower_local):
    spec, _ = flower_local("--min-cohort", "2")
    assert (spec.secure_aggregation, spec.min_cohort) == (True, 2)
    spec, _ = flower_local("--no-secure-aggregation")
    assert not spec.secure_aggregation


def test_flower_local_early_stopping(flower_local):
    spec, _ = flower_local("--early-stopping", "--rounds", "100", "--set", "patience=8", "min-delta=0.01")
    assert (spec.early_stopping, spec.rounds, spec.patience, spec.min_delta) == (True, 100, 8, 0.01)
    spec, _ = flower_local()
    assert not spec.early_stopping


def test_flower_local_label_key_and_dp(flower_local):
    spec, _ = flower_local("--label-key", "bulk_labels", "--set", "dp.epsilon=8", "task.dropout=0.2")
    assert spec.task == si.tasks.Classification(label_key="bulk_labels", dropout=0.2)
    assert spec.dp is not None
    assert spec.dp.epsilon == 8.0


def test_flower_local_set_needs_key_value_pairs(refused):
    assert "KEY=VALUE pairs, got 'fit.lr'" in refused("flower-local", "--sites", "a.h5ad", "--set", "fit.lr")


def test_flower_local_unknown_task_option_is_named(refused):
    # a classification has no latent
    error = refused("flower-local", "--sites", "a.h5ad", "--set", "task.n-latent=32")
    assert "has no option 'n_latent'" in error


def test_identities_and_a_roster_from_the_shell(tmp_path):
    """What each site runs once, and what the consortium assembles: the roster a SuperNode names."""

    def scinfl(*args, check=True):
        result = subprocess.run(
            [sys.executable, "-m", "scinfl", *args], capture_output=True, text=True, cwd=tmp_path
        )
        assert (result.returncode == 0) == check, result.stderr
        assert "Traceback" not in result.stderr
        return result

    publics = {}
    for site in ("charite", "ucl"):
        made = scinfl("identity", "create", f"{site}.identity").stdout
        assert oct((tmp_path / f"{site}.identity").stat().st_mode & 0o777) == "0o600"
        publics[site] = scinfl("identity", "public", f"{site}.identity").stdout.split()[0]
        assert publics[site] in made
    again = scinfl("identity", "create", "ucl.identity", check=False)
    assert "ucl.identity exists: a site keeps one identity; remove it first" in again.stderr
    scinfl("roster", "create", "roster.json", *(f"--site={s}={k}" for s, k in publics.items()))
    roster = si.federation.identity.Roster.load(tmp_path / "roster.json")
    assert {s: k.hex() for s, k in roster.identities.items()} == publics
    shown = scinfl("roster", "show", "roster.json").stdout
    assert f"roster: {roster.fingerprint}" in shown
    assert "charite: " + roster.fingerprints()["charite"] in shown
    bad = scinfl("roster", "create", "x.json", "--site=a=abcd", check=False)
    assert "--site: Roster: site 'a''s identity key has 2 bytes, not 32." in bad.stderr


def _scinfl(*args: str, cwd, stdin=None) -> subprocess.CompletedProcess:
    """The real entry point, as a user's shell runs it (no passphrase in the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCINFL_")}
    return subprocess.run(
        [sys.executable, "-m", "scinfl", *args], capture_output=True, text=True, cwd=cwd, stdin=stdin, env=env
    )


def _one_line_error(result: subprocess.CompletedProcess, command: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"scinfl {command}: error: ") or lines[0].startswith("scinfl "), lines
    return lines[0]


@pytest.fixture(scope="module")
def site_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sites")
    adata = sc.datasets.pbmc68k_reduced()
    for i in range(3):
        adata[i::3].copy().write_h5ad(folder / f"site_{i}.h5ad")
    return folder


def test_flower_local_checks_every_input_before_starting_a_process(site_files, tmp_path):
    """Each refusal comes from the real entry point, before any SuperLink or SuperNode exists, as one line
    naming the flag to use (issue 35: a missing site file used to surface after 171 s as a site that never
    joined; advice named Python arguments)."""
    sites = [str(site_files / f"site_{i}.h5ad") for i in range(3)]
    missing = _one_line_error(
        _scinfl("flower-local", "--sites", sites[0], sites[1], "nope.h5ad", cwd=tmp_path), "flower-local"
    )
    assert "Site 'nope':" in missing
    assert str(tmp_path / "nope.h5ad") in missing
    assert "does not exist" in missing
    (tmp_path / "cut.h5ad").write_bytes((site_files / "site_2.h5ad").read_bytes()[:5000])
    truncated = _one_line_error(
        _scinfl("flower-local", "--sites", sites[0], sites[1], "cut.h5ad", cwd=tmp_path), "flower-local"
    )
    assert "Site 'cut':" in truncated
    assert "cannot be read as an h5ad file" in truncated
    two = _one_line_error(_scinfl("flower-local", "--sites", *sites[:2], cwd=tmp_path), "flower-local")
    assert "--min-cohort 2" in two
    assert "--no-secure-aggregation" in two
    assert "min_cohort=" not in two
    assert "secure_aggregation=" not in two
    (tmp_path / "out").mkdir()
    checkpoint_path(tmp_path / "out").write_text("{}")
    earlier = _one_line_error(
        _scinfl("flower-local", "--sites", *sites, "--output-dir", "out", cwd=tmp_path), "flower-local"
    )
    assert "holds an earlier run's checkpoint" in earlier
    assert "pass --resume to continue it" in earlier
    assert not (tmp_path / "out" / "flower").exists()  # no deployment was set up
    zero = _scinfl("demo", "--rounds", "0", cwd=tmp_path)  # argparse's usage, then its error line
    assert zero.returncode == 2
    assert "Traceback" not in zero.stderr
    assert zero.stderr.strip().endswith("scinfl demo: error: argument --rounds: must be at least 1, got 0")


def test_key_commands_refuse_in_one_line_what_they_cannot_do(tmp_path):
    existing = tmp_path / "consortium.key"
    assert _scinfl("key", "generate", str(existing), cwd=tmp_path).returncode == 0
    again = _one_line_error(_scinfl("key", "generate", str(existing), cwd=tmp_path), "key")
    assert "never overwrites a key file" in again
    assert "overwrite=True" not in again
    protected = tmp_path / "protected.key"
    si.FederationKey.generate().save(protected, passphrase="correct horse")
    with open(os.devnull) as nothing:
        no_terminal = _one_line_error(
            _scinfl("key", "fingerprint", str(protected), cwd=tmp_path, stdin=nothing), "key"
        )
    assert "protected by a passphrase and none was given: set SCINFL_KEY_PASSPHRASE" in no_terminal
