"""Trial expansion: a sweep spec → configurations (grid product, random draws, explicit points) × seeds → trials.

Every trial is validated with load_config, so a bad key or value fails before anything is written or submitted.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from hpc_drseg.config import ConfigError, SweepConfig, SweepParam, config_to_dict, load_config, parse_overrides


@dataclass
class Trial:
    id: str
    """c<configuration>-s<seed>, e.g. c003-s1."""
    config_id: str
    """Configuration shared by the trials that differ only in their seed."""
    seed: int
    params: dict[str, Any]
    """Swept key → value of this configuration."""
    overrides: list[str]
    """Everything passed to `drseg train` after the base config: fixed, swept, train.seed, train.run_dir."""
    run_dir: str
    config_hash: str
    """Hash of the resolved run config without seed/run_dir: equal hashes train the same configuration."""
    monitor: str
    monitor_mode: str


def _override(key: str, value: Any) -> str:
    """key=value in the flow-YAML form that parse_overrides reads back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _flat_params(overrides: list[str]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for item in overrides:
        node, key = parse_overrides([item]), item.partition("=")[0]
        for part in key.split("."):
            node = node[part]
        flat[key] = node
    return flat


def _sample(param: SweepParam, rng: random.Random) -> Any:
    if param.dist == "choice":
        return param.values[rng.randrange(len(param.values))]
    low, high = float(param.low), float(param.high)  # type: ignore[arg-type]
    if param.dist == "loguniform":
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    return float(f"{value:.4g}")  # 4 significant digits: readable overrides and tables, same draw for a seed


def sweep_points(spec: SweepConfig) -> list[list[str]]:
    """The configurations as override lists: grid product, then random draws, then explicit points."""
    points: list[list[str]] = []
    if spec.grid:  # product() of nothing is one empty configuration, not none
        keys = list(spec.grid)
        points = [[_override(k, v) for k, v in zip(keys, values)] for values in product(*spec.grid.values())]
    rng = random.Random(spec.random.seed)
    for _ in range(spec.random.trials):
        points.append([_override(p.key, _sample(p, rng)) for p in spec.random.params])
    points.extend(list(point) for point in spec.points)
    return points


def expand_trials(spec: SweepConfig, sweep_dir: str | Path) -> list[Trial]:
    """Every configuration × every seed, each validated with load_config (a bad key fails before any submission)."""
    sweep_dir = Path(sweep_dir).resolve()
    trials = []
    for index, point in enumerate(sweep_points(spec)):
        clash = set(_flat_params(point)) & set(_flat_params(spec.overrides))
        if clash:
            raise ConfigError(
                f"sweep {spec.name}: {sorted(clash)} is both swept and fixed in `overrides`; keep it in one place"
            )
        for seed in spec.seeds:
            trials.append(_make_trial(spec, f"c{index:03d}", point, seed, sweep_dir))
    return trials


def _make_trial(spec: SweepConfig, config_id: str, point: list[str], seed: int, sweep_dir: Path) -> Trial:
    trial_id = f"{config_id}-s{seed}"
    run_dir = sweep_dir / "runs" / trial_id
    overrides = [*spec.overrides, *point, f"train.seed={seed}", f"train.run_dir={run_dir}"]
    try:
        cfg = load_config(spec.base_config, overrides)
    except ConfigError as exc:
        raise ConfigError(f"sweep {spec.name}, trial {trial_id} ({' '.join(point)}): {exc}") from exc
    resolved = config_to_dict(cfg)
    resolved.pop("name")
    resolved["train"].pop("seed")
    resolved["train"].pop("run_dir")
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:12]
    return Trial(
        id=trial_id,
        config_id=config_id,
        seed=seed,
        params=_flat_params(point),
        overrides=overrides,
        run_dir=str(run_dir),
        config_hash=digest,
        monitor=cfg.train.monitor,
        monitor_mode=cfg.train.monitor_mode,
    )
