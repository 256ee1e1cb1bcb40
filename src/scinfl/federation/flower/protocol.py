"""What crosses the wire between scinfl's ServerApp and ClientApp.

Every message carries Flower records: weights as an ``ArrayRecord``, the run spec, instructions and what a
site publishes as a ``ConfigRecord``, metrics as a ``MetricRecord``. The functions here turn the round
loop's :class:`~scinfl.federation.Hello`, :class:`~scinfl.federation.Instruction` and
:class:`~scinfl.federation.Reply` into records and back, so that the in-process and Flower engines exchange
the same things. None of it is key material: a site reports its key's fingerprint (a public version tag),
its description (names and counts), its cell count, metrics and DP accounting.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from ...data.statistics import StatisticRequest
from ...tasks import ModelConfig
from ...train import LocalFitResult
from ..secure import MaskedUpdate, SecureRound
from ..site import Hello, Instruction, Reply
from ..spec import RunSpec
from ..statistics import SiteProfile, StatisticsSpec

__all__ = [
    "arrays_to_state",
    "decode_hello",
    "decode_instruction",
    "decode_profile",
    "decode_reply",
    "decode_statistic",
    "decode_statistics_request",
    "encode_failure",
    "encode_hello",
    "encode_instruction",
    "encode_profile",
    "encode_reply",
    "encode_statistic",
    "encode_statistics_request",
    "state_to_arrays",
]

# Record names inside a message's RecordDict.
WEIGHTS: Final = "weights"
UPDATE: Final = "update"
INSTRUCTION: Final = "instruction"
SECURE: Final = "secure"
SITE: Final = "site"
METRICS: Final = "metrics"
ARRAYS: Final = "arrays"  # a statistics request's arrays (clip values, a basis)
STATISTIC: Final = "statistic"  # a site's statistic, masked or in the clear

# Message types: who is there (query), the initial weights of a hardened run (query.init), rounds (train),
# and federated preprocessing's profiles and statistics (query.statistics).
HELLO: Final = "query"
INIT: Final = "query.init"
TRAIN: Final = "train"
STATISTICS: Final = "query.statistics"


def state_to_arrays(state: Mapping[str, Tensor]) -> ArrayRecord:
    """A state dict as an ``ArrayRecord`` (exact: float32 stays float32, int64 stays int64)."""
    return ArrayRecord({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()})


def arrays_to_state(record: ArrayRecord) -> dict[str, Tensor]:
    """The state dict an ``ArrayRecord`` carries, as torch tensors in the record's order."""
    return dict(record.to_torch_state_dict())


def run_record(spec: RunSpec, config: ModelConfig | None = None) -> ConfigRecord:
    """The run spec (and, once agreed, the architecture with its schema) for a site."""
    return ConfigRecord(
        {"spec": spec.to_json(), "config": "" if config is None else json.dumps(config.to_dict())}
    )


def read_run(record: ConfigRecord) -> tuple[RunSpec, ModelConfig | None]:
    config = str(record["config"])
    return RunSpec.from_json(str(record["spec"])), None if not config else ModelConfig.from_dict(
        json.loads(config)
    )


def encode_hello(site: str, answer: Hello) -> RecordDict:
    return RecordDict(
        {
            SITE: ConfigRecord(
                {
                    "site": site,
                    "key-fingerprint": answer.key_fingerprint or "",
                    "description": json.dumps(answer.description),
                    "masking-key": answer.masking_key or b"",
                    "masking-signature": answer.masking_signature or b"",
                }
            )
        }
    )


def encode_failure(site: str, reason: str) -> RecordDict:
    """A SuperNode's answer when its site cannot join (its data or key file is missing or wrong): the site
    it serves, from its node config, and why. Without it the server could name only a node ID."""
    return RecordDict({SITE: ConfigRecord({"site": site, "failure": reason})})


def decode_hello(content: RecordDict) -> tuple[str, Hello | str]:
    """The site's name and its :class:`Hello`, or the reason it cannot join (:func:`encode_failure`)."""
    record = content[SITE]
    if "failure" in record:
        return str(record["site"]), str(record["failure"])
    masking_key = bytes(record["masking-key"]) if "masking-key" in record else b""
    signature = bytes(record["masking-signature"]) if "masking-signature" in record else b""
    hello = Hello(
        json.loads(str(record["description"])),
        str(record["key-fingerprint"]) or None,
        masking_key or None,
        signature or None,
    )
    return str(record["site"]), hello


def encode_instruction(
    site: str, state: Mapping[str, Tensor], run: ConfigRecord, instruction: Instruction
) -> RecordDict:
    secure = instruction.secure
    content = RecordDict(
        {
            WEIGHTS: state_to_arrays(state),
            SITE: run,
            INSTRUCTION: ConfigRecord(
                {
                    "site": site,
                    "round": instruction.round_index,
                    "train": instruction.train,
                    "evaluate": instruction.evaluate,
                    "fit-seed": instruction.fit_seed,
                    "restore": "" if instruction.restore is None else json.dumps(instruction.restore),
                }
            ),
        }
    )
    if secure is not None:
        content[SECURE] = _secure_record(secure)
    return content


def _secure_record(secure: SecureRound) -> ConfigRecord:
    """A secure round's cohort, their public masking keys and each member's signature of its key."""
    return ConfigRecord(
        {
            "round": secure.round_index,
            "attempt": secure.attempt,
            "cohort": list(secure.cohort),
            "public-keys": [bytes(secure.public_keys[s]) for s in secure.cohort],
            "signatures": [bytes(secure.signatures.get(s) or b"") for s in secure.cohort],
            "run": secure.run,
        }
    )


def _read_secure(content: RecordDict) -> SecureRound | None:
    if SECURE not in content:
        return None
    record = content[SECURE]
    cohort = tuple(str(s) for s in record["cohort"])
    return SecureRound(
        round_index=int(record["round"]),
        attempt=int(record["attempt"]),
        cohort=cohort,
        public_keys=dict(zip(cohort, (bytes(k) for k in record["public-keys"]), strict=True)),
        run=str(record["run"]),
        signatures=dict(zip(cohort, (bytes(k) for k in record.get("signatures", [])), strict=False)),
    )


def decode_instruction(content: RecordDict) -> tuple[str, dict[str, Tensor], Instruction]:
    record = content[INSTRUCTION]
    restore = str(record["restore"])
    secure = _read_secure(content)
    instruction = Instruction(
        train=bool(record["train"]),
        evaluate=bool(record["evaluate"]),
        fit_seed=int(record["fit-seed"]),
        restore=json.loads(restore) if restore else None,
        secure=secure,
        round_index=int(record["round"]),
    )
    return str(record["site"]), arrays_to_state(content[WEIGHTS]), instruction


def encode_reply(site: str, reply: Reply) -> RecordDict:
    metrics: dict[str, float | int] = {"n-train": reply.n_train, "num-examples": reply.n_train}
    if reply.evaluation is not None:
        metrics |= {f"evaluate/{k}": float(v) for k, v in reply.evaluation.items()}
    content = RecordDict()
    masked = isinstance(reply.update, MaskedUpdate)
    if reply.update is not None:
        metrics |= {f"fit/{k}": float(v) for k, v in reply.update.metrics.items()}
        if not masked:
            content[UPDATE] = state_to_arrays(reply.update.state)
        elif reply.update.masked is not None:  # the one array a secure round sends
            content[UPDATE] = ArrayRecord({"masked": Array(reply.update.masked)})
    content[SITE] = ConfigRecord(
        {
            "site": site,
            "key-fingerprint": reply.key_fingerprint or "",
            "trained": reply.update is not None,
            "masked": masked,
            "finite": reply.update.finite if masked else True,
            "local-state": json.dumps(reply.local_state),
        }
    )
    content[METRICS] = MetricRecord(metrics)
    return content


def decode_reply(content: RecordDict) -> Reply:
    record, metrics = content[SITE], content[METRICS]
    fingerprint = str(record["key-fingerprint"]) or None
    n_train = int(metrics["n-train"])
    update = None
    fit_metrics = {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("fit/")}
    if bool(record["trained"]) and bool(record.get("masked", False)):
        update = MaskedUpdate(
            masked=content[UPDATE]["masked"].numpy() if UPDATE in content else None,
            n_obs=n_train,
            key_fingerprint=fingerprint,
            metrics=fit_metrics,
            finite=bool(record["finite"]),
        )
    elif bool(record["trained"]):
        update = LocalFitResult(
            state=arrays_to_state(content[UPDATE]),
            n_obs=n_train,
            key_fingerprint=fingerprint,
            metrics=fit_metrics,
        )
    evaluation = {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("evaluate/")}
    return Reply(
        n_train=n_train,
        key_fingerprint=fingerprint,
        update=update,
        evaluation=evaluation or None,
        local_state=json.loads(str(record["local-state"])),
    )


def encode_statistics_request(
    spec: StatisticsSpec, request: StatisticRequest | None, secure: SecureRound | None
) -> RecordDict:
    """A statistics exchange's message to a site: the exchange's spec and the statistic (None: the site's
    profile), its arrays, and under secure aggregation the cohort's public masking keys."""
    content = RecordDict(
        {
            SITE: ConfigRecord(
                {"spec": json.dumps(spec.to_dict()), "request": "" if request is None else request.to_json()}
            )
        }
    )
    if request is not None and request.arrays:
        content[ARRAYS] = ArrayRecord(
            {name: Array(np.ascontiguousarray(values)) for name, values in request.arrays.items()}
        )
    if secure is not None:
        content[SECURE] = _secure_record(secure)
    return content


def decode_statistics_request(
    content: RecordDict,
) -> tuple[StatisticsSpec, StatisticRequest | None, SecureRound | None]:
    record = content[SITE]
    spec = StatisticsSpec.from_dict(json.loads(str(record["spec"])))
    text = str(record["request"])
    arrays = {name: array.numpy() for name, array in content[ARRAYS].items()} if ARRAYS in content else {}
    request = StatisticRequest.from_json(text, arrays) if text else None
    return spec, request, _read_secure(content)


def encode_profile(site: str, profile: SiteProfile) -> RecordDict:
    return RecordDict(
        {
            SITE: ConfigRecord(
                {
                    "site": site,
                    "profile": json.dumps(profile.description),
                    "masking-key": profile.masking_key or b"",
                    "masking-signature": profile.masking_signature or b"",
                }
            )
        }
    )


def decode_profile(content: RecordDict) -> tuple[str, SiteProfile | str]:
    """The site's name and its :class:`SiteProfile`, or why it cannot take part (:func:`encode_failure`)."""
    record = content[SITE]
    if "failure" in record:
        return str(record["site"]), str(record["failure"])
    masking_key = bytes(record["masking-key"]) or None
    signature = bytes(record["masking-signature"]) if "masking-signature" in record else b""
    return str(record["site"]), SiteProfile(
        json.loads(str(record["profile"])), masking_key, signature or None
    )


def encode_statistic(site: str, vector: np.ndarray) -> RecordDict:
    """A site's statistic: float64 in the clear, or uint64 masked (the only array a secure exchange sends)."""
    return RecordDict(
        {
            SITE: ConfigRecord({"site": site}),
            STATISTIC: ArrayRecord({"values": Array(np.ascontiguousarray(vector))}),
        }
    )


def decode_statistic(content: RecordDict) -> np.ndarray | str:
    record = content[SITE]
    if "failure" in record:
        return str(record["failure"])
    return content[STATISTIC]["values"].numpy()
