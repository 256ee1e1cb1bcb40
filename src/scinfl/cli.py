"""Command line: ``scinfl demo``, ``scinfl flower-local``, ``scinfl key``, ``scinfl identity``, ``scinfl roster``."""

from __future__ import annotations

import argparse
import os
import re
import sys

__all__ = ["main"]

# Set to see the traceback behind a command's one-line error.
DEBUG_ENV = "SCINFL_DEBUG"


class UsageError(Exception):
    """A command given what it cannot use: one line to the user, exit status 2 (as argparse's own)."""


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value:g}")
    return value


# The library's advice names Python arguments; a command line user needs the flags (flower-local's).
_FLAG_SPELLINGS = (
    (re.compile(r"\bmin_cohort=(\d+)"), r"--min-cohort \1"),
    (re.compile(r"\bsecure_aggregation=False\b"), "--no-secure-aggregation"),
    (re.compile(r"\bsecure_aggregation=\{'min_cohort': (\d+)\}"), r"--min-cohort \1"),
    (re.compile(r"\bresume=True\b( \(scinfl flower-local --resume\))?"), "--resume"),
    (re.compile(r"\bmin_sites=(\d+)"), r"--min-sites \1"),
    (re.compile(r"\bround_timeout=([\d.]+)"), r"--round-timeout \1"),
    (re.compile(r"\bcheckpoint_dir=?"), "--output-dir"),
)


def command_line_advice(message: str) -> str:
    """``message`` with the Python arguments it advises spelled as ``scinfl flower-local``'s flags."""
    for pattern, flag in _FLAG_SPELLINGS:
        message = pattern.sub(flag, message)
    return message


def main(argv: list[str] | None = None) -> int:
    """Run a command; an error the user can act on is one line on stderr (no traceback; set
    ``SCINFL_DEBUG=1`` to see it), exit status 2 for bad input and 1 for a run that failed."""
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except KeyboardInterrupt:
        print(f"scinfl {args.command}: interrupted.", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileExistsError, FileNotFoundError, PermissionError) as err:
        return _fail(args, err, status=2)
    except (RuntimeError, OSError, TimeoutError) as err:
        return _fail(args, err, status=1)
    return 0


def _fail(args, err: BaseException, *, status: int) -> int:
    if os.environ.get(DEBUG_ENV):
        raise err
    message = command_line_advice(str(err)).strip() or type(err).__name__
    print(f"scinfl {args.command}: error: {message}", file=sys.stderr)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scinfl", description="Key-embedded federated learning for omics.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train centralised, per-site, FedAvg and INFL models on real PBMCs and compare them",
        description="Real data (scanpy's pbmc68k_reduced), 3 label-skewed sites, a 20% held-out test set.",
    )
    demo.add_argument("--rounds", type=_at_least(1), default=20, help="federated rounds (default 20)")
    demo.add_argument(
        "--seeds", type=_at_least(1), default=3, help="training seeds to average over (default 3)"
    )
    demo.add_argument("--wrong-keys", type=_at_least(1), default=10, help="wrong keys per seed (default 10)")
    demo.add_argument("--hidden", type=_at_least(1), default=256, help="network width (default 256)")
    demo.add_argument("--output-dir", default=".", help="where to write scinfl_demo.h5ad and the PNG")
    flower = commands.add_parser(
        "flower-local",
        help="train across a local Flower deployment: a SuperLink and one SuperNode per site file on 127.0.0.1",
        description="Starts flower-superlink and one flower-supernode per site (named after its file; an "
        ".h5mu file is a multi-omics site) on loopback, runs scinfl's Flower apps with `flwr run`, writes the "
        "model to OUTPUT_DIR/model, and stops every process it started. Needs pip install 'scinfl[flower]'. "
        "See docs/across_sites.md.",
    )
    flower.add_argument(
        "--sites", nargs="+", required=True, metavar="FILE", help="one .h5ad (or .h5mu) per site"
    )
    flower.add_argument("--key", default=None, help="the consortium's key file (omit for plain FedAvg)")
    flower.add_argument(
        "--task", default="classification", help="classification, embedding, perturbation or mosaic"
    )
    flower.add_argument("--label-key", default=None, help=".obs column with the labels")
    flower.add_argument("--layer", default=None, help="layer with the features (default .X)")
    flower.add_argument("--use-raw", action="store_true", help="use .raw")
    flower.add_argument("--modality", default=None, help="the modality of .h5ad sites of a mosaic")
    flower.add_argument("--rounds", type=_at_least(1), default=20, help="federated rounds (default 20)")
    flower.add_argument(
        "--early-stopping",
        action="store_true",
        help="stop once the validation loss has converged (--rounds is then the most; tune with --set "
        "patience=N min-delta=X)",
    )
    flower.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    flower.add_argument(
        "--min-sites", type=_at_least(0), default=0, help="sites that must answer each round (0: all)"
    )
    flower.add_argument(
        "--round-timeout", type=_positive_seconds, default=600.0, help="seconds per round (default 600)"
    )
    flower.add_argument(
        "--min-cohort",
        type=_at_least(2),
        default=3,
        help="fewest sites a round sums under secure aggregation (default 3; 2 lets each of two sites "
        "learn the other's update)",
    )
    flower.add_argument(
        "--no-secure-aggregation",
        action="store_true",
        help="send updates in the clear (default: masked, the server learns only each round's sum)",
    )
    flower.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="any other run setting, as in the run config: task.hidden=64 task.n-latent=32 fit.lr=0.01 dp.epsilon=8",
    )
    flower.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR's checkpoint")
    flower.add_argument(
        "--insecure",
        action="store_true",
        help="connections in the clear, and no SuperNode authentication (default: TLS with a certificate "
        "authority of the deployment's own)",
    )
    flower.add_argument(
        "--tls-certificates",
        nargs=3,
        metavar=("CA", "CERTIFICATE", "PRIVATE_KEY"),
        default=None,
        help="the SuperLink's certificate, its private key and the CA that signed it (default: a CA made for "
        "this deployment)",
    )
    flower.add_argument(
        "--supernode-key",
        action="append",
        default=[],
        metavar="SITE=PATH",
        help="a site's SuperNode private key (OpenSSH EC, e.g. ssh-keygen -t ecdsa -b 384; default: a key "
        "pair made for this deployment); repeat for each site",
    )
    flower.add_argument(
        "--no-supernode-auth",
        action="store_true",
        help="let in any SuperNode (default: only those whose key pair, made for this deployment, is registered)",
    )
    flower.add_argument("--output-dir", default="scinfl-flower", help="checkpoint, model and logs")
    key = commands.add_parser(
        "key",
        help="generate, inspect, protect and rotate the consortium's key file",
        description="Passphrases are read from SCINFL_KEY_PASSPHRASE (or the file named by "
        "SCINFL_KEY_PASSPHRASE_FILE), else asked for on the terminal: never from the command line, where "
        "every user of the machine can read them.",
    )
    verbs = key.add_subparsers(dest="verb", required=True)
    generate = verbs.add_parser("generate", help="write a new key file (0600)")
    generate.add_argument("path")
    generate.add_argument("--scheme", default="hardened", choices=("hardened", "infl"))
    generate.add_argument("--protect", action="store_true", help="encrypt it under a passphrase")
    fingerprint = verbs.add_parser("fingerprint", help="print a key file's public fingerprint")
    fingerprint.add_argument("path")
    protect = verbs.add_parser("protect", help="encrypt an existing key file under a passphrase, in place")
    protect.add_argument("path")
    rotate = verbs.add_parser(
        "rotate", help="write a new key of the same scheme (move models with scinfl.tl.rekey)"
    )
    rotate.add_argument("old")
    rotate.add_argument("new")
    rotate.add_argument("--protect", action="store_true", help="encrypt the new key under a passphrase")
    identity = commands.add_parser(
        "identity",
        help="a site's identity key, which signs its masking keys (secure aggregation)",
        description="Each site makes its own identity once and keeps it (0600); the consortium collects the "
        "public halves into a roster (`scinfl roster create`) that every site holds. A SuperNode names both in "
        "its --node-config (identity-path, roster-path).",
    )
    identity_verbs = identity.add_subparsers(dest="verb", required=True)
    create_identity = identity_verbs.add_parser("create", help="write a new identity file (0600)")
    create_identity.add_argument("path", help="where to write it, e.g. /secure/charite.identity")
    show_identity = identity_verbs.add_parser(
        "public", help="print the identity's public key (hex, for the roster) and its fingerprint"
    )
    show_identity.add_argument("path")
    roster = commands.add_parser(
        "roster",
        help="the consortium's roster: every site's name and identity public key",
        description="Every site holds the same roster and compares its fingerprint with the others' out of band.",
    )
    roster_verbs = roster.add_subparsers(dest="verb", required=True)
    create_roster = roster_verbs.add_parser("create", help="write a roster from each site's public key")
    create_roster.add_argument("path", help="where to write it, e.g. roster.json")
    create_roster.add_argument(
        "--site",
        action="append",
        required=True,
        metavar="NAME=PUBLIC_KEY",
        help="a site and its identity public key (hex, from `scinfl identity public`); repeat for each site",
    )
    show_roster = roster_verbs.add_parser(
        "show", help="print each site's identity fingerprint and the roster's"
    )
    show_roster.add_argument("path")
    return parser


def _run(args) -> None:
    if args.command == "demo":
        from .demo import run_demo

        run_demo(
            rounds=args.rounds,
            seeds=args.seeds,
            n_wrong_keys=args.wrong_keys,
            hidden=args.hidden,
            output_dir=args.output_dir,
        )
    elif args.command == "flower-local":
        from .deployment import run_local_deployment

        settings = {
            "task.name": args.task,
            "rounds": args.rounds,
            "early-stopping": args.early_stopping,
            "seed": args.seed,
            "min-sites": args.min_sites,
            "round-timeout": args.round_timeout,
            "min-cohort": args.min_cohort,
            "secure-aggregation": not args.no_secure_aggregation,
            **({"task.label-key": args.label_key} if args.label_key else {}),
            **_run_config_overrides(args.set),
        }
        model = run_local_deployment(
            args.sites,
            key_path=args.key,
            output_dir=args.output_dir,
            settings=settings,
            fields={"layer": args.layer, "use_raw": args.use_raw, "modality": args.modality},
            resume=args.resume,
            tls=_tls_option(args),
            authenticate=not (args.insecure or args.no_supernode_auth),
            supernode_keys=_assignments(args.supernode_key, "--supernode-key"),
        )
        print(f"Model written to {model} (load it with scinfl.FederatedModel.load).")
    elif args.command == "key":
        _key_command(args)
    elif args.command in ("identity", "roster"):
        _identity_command(args)


def _identity_command(args) -> None:
    from .federation.identity import Roster, SiteIdentity

    if args.command == "identity" and args.verb == "create":
        made = SiteIdentity.generate()
        try:
            made.save(args.path)
        except FileExistsError:
            raise UsageError(
                f"{args.path} exists: a site keeps one identity; remove it first to make a new one."
            ) from None
        print(
            f"Wrote a site identity to {args.path} (0600); public key {made.public.hex()}, fingerprint {made.fingerprint}."
        )
    elif args.command == "identity":
        loaded = SiteIdentity.load(args.path)
        print(f"{loaded.public.hex()} (fingerprint {loaded.fingerprint})")
    elif args.verb == "create":
        try:
            sites = {name: bytes.fromhex(key) for name, key in _assignments(args.site, "--site").items()}
            made = Roster(sites)
        except ValueError as err:
            raise UsageError(f"--site: {err}") from None
        made.save(args.path)
        print(f"Wrote the roster of {len(sites)} sites to {args.path}; fingerprint {made.fingerprint}.")
    else:
        loaded = Roster.load(args.path)
        for name, fingerprint in loaded.fingerprints().items():
            print(f"{name}: {fingerprint}")
        print(f"roster: {loaded.fingerprint}")


def _tls_option(args) -> bool | dict[str, str]:
    if args.insecure and args.tls_certificates:
        raise UsageError("--insecure and --tls-certificates exclude each other.")
    if args.tls_certificates:
        return dict(zip(("ca", "certificate", "private_key"), args.tls_certificates, strict=True))
    return not args.insecure


def _assignments(
    items: list[str], flag: str, *, form: str = "NAME=VALUE", empty: bool = False
) -> dict[str, str]:
    """``NAME=VALUE`` items as a dict (``empty``: a value may be empty)."""
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not (value or empty):
            raise UsageError(f"{flag} takes {form}, got {item!r}.")
        pairs[name.strip()] = value
    return pairs


def _new_passphrase() -> str:
    """A passphrase to protect a key with: from the environment, else typed twice on the terminal."""
    import getpass

    from .key import PASSPHRASE_ENV

    value, file = (os.environ.get(name) for name in PASSPHRASE_ENV)
    if value or file:
        from pathlib import Path

        return value or Path(file).read_text().rstrip("\r\n")
    if not sys.stdin.isatty():  # no terminal to ask on
        raise UsageError(
            f"No passphrase given: set {PASSPHRASE_ENV[0]} (or {PASSPHRASE_ENV[1]}, a file holding it), or run "
            "the command on a terminal."
        )
    first = getpass.getpass("Passphrase for the key file: ")
    if first != getpass.getpass("The same passphrase again: "):
        raise UsageError("The two passphrases differ; nothing was written.")
    return first


def _load_key(path: str):
    """A key file, asking for its passphrase on the terminal if it is protected and none is set."""
    import getpass

    from .key import PASSPHRASE_ENV, FederationKey, KeyFileError

    try:
        return FederationKey.load(path)
    except KeyFileError as err:
        if "protected by a passphrase" not in str(err):
            raise UsageError(str(err)) from None
        if not sys.stdin.isatty():  # no terminal to ask on
            raise UsageError(
                f"{path} is protected by a passphrase and none was given: set {PASSPHRASE_ENV[0]} (or "
                f"{PASSPHRASE_ENV[1]}, a file holding it), or run the command on a terminal."
            ) from None
        try:
            return FederationKey.load(path, passphrase=getpass.getpass(f"Passphrase of {path}: "))
        except KeyFileError as again:
            raise UsageError(str(again)) from None
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None


def _key_command(args) -> None:
    from .key import FederationKey

    if args.verb in ("generate", "rotate"):
        target = args.path if args.verb == "generate" else args.new
        if os.path.exists(target):
            raise UsageError(
                f"{target} exists: scinfl never overwrites a key file (the models trained under it need it); "
                "choose another path, or move it away first."
            )
    if args.verb == "generate":
        key = FederationKey.generate(scheme=args.scheme)
        key.save(args.path, passphrase=_new_passphrase() if args.protect else None)
        print(
            f"Wrote a {key.scheme} key to {args.path} (0600{', protected' if args.protect else ''}); fingerprint {key.fingerprint}."
        )
    elif args.verb == "fingerprint":
        key = _load_key(args.path)
        print(key.fingerprint)
    elif args.verb == "protect":
        key = _load_key(args.path)
        key.save(args.path, overwrite=True, passphrase=_new_passphrase())
        print(f"{args.path} is now protected by a passphrase (fingerprint {key.fingerprint}).")
    elif args.verb == "rotate":
        old = _load_key(args.old)
        new = FederationKey.generate(scheme=old.scheme)
        new.save(args.new, passphrase=_new_passphrase() if args.protect else None)
        print(
            f"Wrote a new {new.scheme} key to {args.new}: fingerprint {new.fingerprint} (was {old.fingerprint}). "
            "Move a trained model to it with scinfl.tl.rekey(model, old_key=..., new_key=...), then give the new "
            "file to every site."
        )


def _run_config_overrides(pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs as run-config entries (numbers and booleans parsed, as Flower's CLI does)."""
    out: dict[str, object] = {}
    for key, value in _assignments(pairs, "--set", form="KEY=VALUE pairs", empty=True).items():
        parsed: object = value
        if value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    parsed = kind(value)
                    break
                except ValueError:
                    continue
        out[key] = parsed
    return out


if __name__ == "__main__":
    sys.exit(main())
