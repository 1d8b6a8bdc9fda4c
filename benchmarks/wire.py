"""Bytes a site sends and receives per round, in each encoding of :mod:`models.sites.encoding`,
and what sending float32 does to the model: explicit ALS on ML-1M as ``fedrec train`` builds it
(its defaults: k=32, reg 0.1, 10 rounds, seed 0, random 80/10/10 split per client), for each
partition given (default: 3 sites by occupation, as ``--partition by-key --partition-key
occupation --clients 3``, and 10 iid clients, the CLI's default).

Per client and training round it encodes the client's answer (``models.protocol.answer_arrays``
of its update and its evaluation sums, what the flow stores today with ``np.savez``) and the
global state it receives (the family's ``state_arrays``) four ways: float64 (today's bytes),
float32, float32 + deflate, float64 + deflate; it times encode and decode (median of
``--repeats`` each) and checks that decoding gives the arrays back (bit for bit in float64,
within float32's epsilon in float32).

The effect on the model: the reference loop (``models.federation.loop.run_family``) runs the
same partition and seed twice, exactly and with every state a client receives and every update
it sends round-tripped through float32 packing; the final global states are evaluated exactly on
every client's test rows. Deflate is lossless (checked), so float32 + deflate trains as float32.

    nice -n 10 uv run --frozen python -m benchmarks.wire [--rounds 10] [--factors 32 64]
        [--partitions 3:by-key:occupation 10:iid] [--seeds 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import HelpFormatter, machine, median, print_table, write_json

ENCODINGS = {  # name -> (precision, compress); the first is what is sent today
    "float64": ("float64", False),
    "float32": ("float32", False),
    "float32+deflate": ("float32", True),
    "float64+deflate": ("float64", True),
}
CAP = 2_000_000_000
EPS32 = 2.0**-23


@dataclass
class Partition:
    clients: int
    strategy: str
    key: str | None = None

    @classmethod
    def parse(cls, text: str) -> Partition:
        parts = text.split(":")
        return cls(int(parts[0]), parts[1], parts[2] if len(parts) > 2 else None)

    def label(self) -> str:
        return f"{self.clients} {self.strategy}" + (f" {self.key}" if self.key else "")


def load_clients(partition: Partition, factors: int, seed: int):
    """The CLI's data, clients and explicit-MF configuration for this partition."""
    from fedrec.config import TrainingConfig
    from tasks.data import load_interactions, plan_clients

    config = TrainingConfig(
        data="ml-1m",
        clients=partition.clients,
        partition=partition.strategy,
        partition_key=partition.key,
        factors=factors,
        seed=seed,
    )
    data, split = load_interactions.fn(config)
    return plan_clients(data, split, config), data.n_items, config.mf_config()


def _timed(fn, repeats: int) -> tuple[Any, float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - started)
    return out, median(seconds)


def _same(back: dict[str, np.ndarray], sent: dict[str, np.ndarray], precision: str) -> bool:
    """Whether decoding gave ``sent`` back: bit for bit, or within float32 rounding."""
    if set(back) != set(sent):
        return False
    for name, value in sent.items():
        value = np.asarray(value)
        if precision == "float32" and value.dtype == np.float64:
            if not np.all(np.abs(back[name] - value) <= EPS32 * np.abs(value)):
                return False
        elif back[name].dtype != value.dtype or back[name].tobytes() != value.tobytes():
            return False
    return True


def measure_encodings(arrays: dict[str, np.ndarray], repeats: int) -> dict[str, float]:
    """Bytes, encode and decode seconds of ``arrays`` in each encoding (fails if one is lossy
    beyond its precision)."""
    from models.sites.encoding import decode_arrays, encode_arrays

    out: dict[str, float] = {}
    for name, (precision, compress) in ENCODINGS.items():
        data, encode_s = _timed(
            lambda p=precision, c=compress: encode_arrays(arrays, precision=p, compress=c), repeats
        )
        back, decode_s = _timed(lambda d=data: decode_arrays(d, max_bytes=CAP), repeats)
        if not _same(back, arrays, precision):
            raise AssertionError(f"{name} did not give the arrays back")
        out |= {f"{name}/bytes": len(data), f"{name}/encode_s": encode_s}
        out[f"{name}/decode_s"] = decode_s
    return out


@dataclass(eq=False)
class OverTheWire:
    """A family whose clients receive the state and send their answers through the encoding:
    ``precision`` None passes them as they are; ``record`` collects the bytes and timings of
    every training round's answer and state (with the evaluation sums the flow asks for)."""

    inner: Any
    precision: str | None = None
    record: list[dict[str, float]] | None = None
    repeats: int = 3
    _measured_states: set[int] = field(default_factory=set)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def _received(self, state: Any) -> Any:
        if self.precision is None:
            return state
        from models.sites.encoding import decode_arrays, encode_arrays

        data = encode_arrays(self.inner.state_arrays(state), precision=self.precision)
        return self.inner.load_state(decode_arrays(data, max_bytes=CAP))

    def _sent(self, update: Any, evaluations: dict) -> Any:
        if self.precision is None:
            return update
        from models.protocol import answer_arrays, answer_from_arrays
        from models.sites.encoding import decode_arrays, encode_arrays

        data = encode_arrays(answer_arrays(update, evaluations), precision=self.precision)
        return answer_from_arrays(decode_arrays(data, max_bytes=CAP))[0]

    def client_round(self, client, state, phase, rng, eval_splits):
        received = self._received(state)
        if self.record is None or phase != "train":
            update, evaluations = self.inner.client_round(client, received, phase, rng, eval_splits)
            return self._sent(update, evaluations), evaluations
        asked = self.inner.eval_splits  # what the flow asks of an evaluating round
        update, evaluations = self.inner.client_round(client, received, phase, rng, asked)
        self._measure(client, state, update, evaluations)
        return self._sent(update, evaluations), {s: evaluations[s] for s in eval_splits}

    def evaluate(self, client, state, splits):
        return self.inner.evaluate(client, self._received(state), splits)

    def _measure(self, client, state, update, evaluations) -> None:
        from models.protocol import answer_arrays

        assert self.record is not None
        answer = answer_arrays(update, evaluations)
        row: dict[str, Any] = {"round": state.round + 1, "client": client.client_id}
        per_item = sum(a.shape[1] for a in update.arrays.values()) + 2  # + item id and count
        row |= {"touched_items": int(update.items.size), "numbers_per_item": per_item}
        row |= {"nbytes": update.nbytes(), "train_rows": update.n_rows}
        row |= {f"update/{k}": v for k, v in measure_encodings(answer, self.repeats).items()}
        if id(state) not in self._measured_states:  # the state is encoded once per round
            self._measured_states.add(id(state))
            arrays = self.inner.state_arrays(state)
            row |= {f"state/{k}": v for k, v in measure_encodings(arrays, self.repeats).items()}
        self.record.append(row)


def final_test_rmse(family, clients, state, n_items: int) -> float:
    from models.federation.evaluation import summarize_splits

    parts = [family.evaluate(c, state, ("test",)) for c in clients]
    return summarize_splits(parts, family.top_k, n_items)["test/rmse"]


def run_partition(partition: Partition, factors: int, args) -> dict[str, Any]:
    """Bytes and timings (one exact run), then the float32 run beside it, per seed."""
    from models.federation.loop import run_family
    from models.mf.family import ExplicitMF

    runs = []
    for seed in args.seeds:
        clients, n_items, mf = load_clients(partition, factors, seed)
        quick = ExplicitMF(mf, ranking=False, baseline=False)  # rating errors only, for RMSE
        record: list[dict[str, float]] = []
        exact = OverTheWire(quick)
        if seed == args.seeds[0]:  # bytes and timings: from the first seed's exact run
            flow_family = ExplicitMF(mf)  # what the flow trains: answers carry its evaluation
            exact = OverTheWire(flow_family, None, record, args.repeats)
        arms: dict[str, Any] = {}
        for arm, family in (("float64", exact), ("float32", OverTheWire(quick, "float32"))):
            started = time.perf_counter()
            state, history = run_family(
                family, clients, n_items, rounds=args.rounds, seed=seed, eval_splits=("valid",)
            )
            arms[arm] = {
                "state": state,
                "seconds": time.perf_counter() - started,
                "valid_rmse": [h["valid/rmse"] for h in history],
                "round_s": [h["system/round_seconds"] for h in history],
            }
        exact, narrow = arms["float64"]["state"], arms["float32"]["state"]
        runs.append({
            "seed": seed,
            "n_items": n_items,
            "client_rows": [c.rows("train").ratings.size for c in clients],
            "test_rmse_float64": final_test_rmse(quick, clients, exact, n_items),
            "test_rmse_float32": final_test_rmse(quick, clients, narrow, n_items),
            "valid_rmse_float64": arms["float64"]["valid_rmse"],
            "valid_rmse_float32": arms["float32"]["valid_rmse"],
            "max_abs_factor_diff": float(np.max(np.abs(exact.params.factors - narrow.params.factors))),
            "max_abs_bias_diff": float(np.max(np.abs(exact.params.bias - narrow.params.bias))),
            "round_s_float64": arms["float64"]["round_s"],  # with the measurements if recorded
            "round_s_float32": arms["float32"]["round_s"],
            "records": record,
        })  # fmt: skip
        print(f"  {partition.label()} k={factors} seed {seed}: "
              f"test RMSE {runs[-1]['test_rmse_float64']:.6f} (float64) "
              f"{runs[-1]['test_rmse_float32']:.6f} (float32)", flush=True)  # fmt: skip
    return {"partition": partition.label(), "factors": factors, "runs": runs}


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per encoding: medians per client per round (over rounds, clients, seeds)."""
    records = [r for run in result["runs"] for r in run["records"]]
    states = [r for r in records if "state/float64/bytes" in r]
    rows = []
    for name in ENCODINGS:
        rows.append({
            "sites": result["partition"], "k": result["factors"], "encoding": name,
            "update_MB": median([r[f"update/{name}/bytes"] for r in records]) / 1e6,
            "update_max_MB": max(r[f"update/{name}/bytes"] for r in records) / 1e6,
            "state_MB": median([r[f"state/{name}/bytes"] for r in states]) / 1e6,
            "update_enc_s": median([r[f"update/{name}/encode_s"] for r in records]),
            "update_dec_s": median([r[f"update/{name}/decode_s"] for r in records]),
            "state_enc_s": median([r[f"state/{name}/encode_s"] for r in states]),
            "state_dec_s": median([r[f"state/{name}/decode_s"] for r in states]),
        })  # fmt: skip
    return rows


def check_claim(partition: str, factors: int, records: list[dict]) -> dict[str, Any]:
    """The update's size against the ALS formula: per touched item a packed (k+1) x (k+1) Gram
    (bias included), a right-hand side of k+1, its count and its id, 8 bytes each."""
    k1 = factors + 1
    formula = k1 * (k1 + 1) // 2 + k1 + 2
    touched = median([r["touched_items"] for r in records])
    return {
        "sites": partition, "k": factors, "numbers_per_item": records[0]["numbers_per_item"],
        "formula": formula, "touched_items": touched,
        "formula_MB": formula * 8 * touched / 1e6,
        "measured_float64_MB": median([r["update/float64/bytes"] for r in records]) / 1e6,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--factors", type=int, nargs="+", default=[32])
    parser.add_argument(
        "--partitions", nargs="+", default=["3:by-key:occupation", "10:iid"],
        help="CLIENTS:STRATEGY[:KEY] as --clients/--partition/--partition-key",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--repeats", type=int, default=1, help="timings per encode/decode")
    parser.add_argument("--output", default="wire_ml-1m")
    args = parser.parse_args()
    from models.data.readers import datasets_dir

    if not (datasets_dir() / "ml-1m").is_dir():
        print(f"skipping: ml-1m not found under {datasets_dir()} (set FEDREC_DATASETS)")
        return
    load_before = os.getloadavg()
    results, rows, quality, claims = [], [], [], []

    def save() -> Path:
        return write_json(args.output, {
            "machine": machine() | {"load_before": load_before, "load_after": os.getloadavg()},
            "args": vars(args), "summary": rows, "claim": claims, "quality": quality,
            "results": results,
        })  # fmt: skip

    for factors in args.factors:
        for text in args.partitions:
            result = run_partition(Partition.parse(text), factors, args)
            results.append(result)
            rows += summarize(result)
            records = result["runs"][0]["records"]
            claims.append(check_claim(result["partition"], factors, records))
            for run in result["runs"]:
                quality.append({
                    "sites": result["partition"], "k": factors, "seed": run["seed"],
                    "test_rmse_f64": f"{run['test_rmse_float64']:.6f}",
                    "test_rmse_f32": f"{run['test_rmse_float32']:.6f}",
                    "rmse_f32_minus_f64": f"{run['test_rmse_float32'] - run['test_rmse_float64']:.1e}",
                    "max_factor_diff": f"{run['max_abs_factor_diff']:.1e}",
                })  # fmt: skip
            save()  # what is measured so far survives a later failure or a stop
    load_after = os.getloadavg()
    print(f"\nPer client per round (medians; load {load_before[0]:.1f} -> {load_after[0]:.1f}):")
    print_table(rows, list(rows[0]))
    print("\nNumbers per touched item (item id and count included) against k1(k1+1)/2 + k1 + 2:")
    print_table(claims, list(claims[0]))
    print("\nFloat32 on the wire against float64, same partition and seed:")
    print_table(quality, list(quality[0]))
    print(f"\nwrote {save()}")


if __name__ == "__main__":
    main()
