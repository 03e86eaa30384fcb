"""Device profiles: how fast each client trains and talks, and how often it is online.

A profile is four numbers per client (`federation.system`): training speed in
samples per second, uplink and downlink bandwidth in bytes per second, and the
probability that the client is online when it is sampled. They come from

- `uniform`: every client the same (`speed`, `uplink`, `downlink`, `online`);
- `mobile`: a log-normal spread around those medians, drawn from (seed, client).
  The spread is that of FedScale's device traces (Lai et al., "FedScale:
  Benchmarking Model and System Performance of Federated Learning at Scale",
  ICML 2022; traces from AI Benchmark and MobiPerf, first used in Oort, OSDI 2021):
  compute and network speeds of phones differ by more than an order of magnitude.
  `MOBILE_SIGMA` makes the 10th-90th percentile ratio about 10x for compute and
  about 20x for bandwidth (docs/heterogeneity.md says what was and was not fitted);
- `trace`: a CSV file, one row per client (`client,speed,uplink,downlink,online`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedssl.config.schema import SystemConfig
from fedssl.csvfile import brief, csv_rows
from fedssl.errors import UserError

PROFILES = ("none", "uniform", "mobile", "trace")
TRACE_COLUMNS = ("client", "speed", "uplink", "downlink", "online")
# Log-normal sigma of `mobile`: exp(2 * 1.2816 * sigma) is the p90/p10 ratio
# (0.9 -> 10.0x for compute, 1.17 -> 20x for bandwidth).
MOBILE_SIGMA = {"speed": 0.9, "bandwidth": 1.17}


@dataclass(frozen=True)
class DeviceProfile:
    """One client's device: samples/s, bytes/s up and down, and P(online)."""

    speed: float
    uplink: float
    downlink: float
    online: float = 1.0


def check_profile(profile: DeviceProfile, where: str) -> None:
    for name in ("speed", "uplink", "downlink"):
        value = getattr(profile, name)
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{where}: {name} must be a finite number > 0, got {value}")
    if not 0 < profile.online <= 1:
        raise UserError(f"{where}: online must be in (0, 1], got {profile.online}")


def mobile_profile(cfg: SystemConfig, seed: int, client_id: int) -> DeviceProfile:
    """Client `client_id`'s draw of the `mobile` set, from (seed, client) alone."""
    rng = np.random.default_rng([seed, client_id, 0xDE71CE])
    speed, up, down = rng.standard_normal(3)
    sigma = MOBILE_SIGMA
    return DeviceProfile(speed=cfg.speed * math.exp(sigma["speed"] * speed),
                         uplink=cfg.uplink * math.exp(sigma["bandwidth"] * up),
                         downlink=cfg.downlink * math.exp(sigma["bandwidth"] * down), online=cfg.online)


def read_trace(path: Path, clients: int) -> dict[int, DeviceProfile]:
    """Every client's profile from a trace CSV; a bad row is refused naming the file and row."""
    if not path.is_file():
        raise UserError(f"federation.system.trace: no such file: {path}")
    profiles: dict[int, DeviceProfile] = {}
    rows = csv_rows(path, f"a trace CSV with the columns {','.join(TRACE_COLUMNS)}")
    _, header = next(rows, (0, []))
    names = [name.strip() for name in header]
    if set(TRACE_COLUMNS) - set(names):
        raise UserError(f"{path}: the header must name the columns {','.join(TRACE_COLUMNS)}, "
                        f"got {','.join(brief(name) for name in names[:10])}")
    for line, fields in rows:
        where = f"{path}: row {line}"
        if not any(field.strip() for field in fields):
            continue  # a blank line, as at the end of a hand-edited file
        if len(fields) != len(names):
            raise UserError(f"{where}: {len(fields)} fields, the header names {len(names)}")
        row = dict(zip(names, fields))
        try:
            client = int(row["client"])
            profile = DeviceProfile(*(float(row[name]) for name in TRACE_COLUMNS[1:]))
        except ValueError:
            raise UserError(f"{where}: expected an integer client and numbers, got "
                            f"{', '.join(f'{name}={brief(row[name])}' for name in TRACE_COLUMNS)}") from None
        if not 0 <= client < clients:
            raise UserError(f"{where}: client {client} is not in [0, federation.clients={clients})")
        if client in profiles:
            raise UserError(f"{where}: client {client} appears twice")
        check_profile(profile, where)
        profiles[client] = profile
    missing = sorted(set(range(clients)) - set(profiles))
    if missing:
        raise UserError(f"{path}: no row for clients {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return profiles


def build_profiles(cfg: SystemConfig, clients: int, seed: int) -> dict[int, DeviceProfile]:
    """Every client's device profile (empty for `profile: none`)."""
    if cfg.profile not in PROFILES:
        raise UserError(f"federation.system.profile: must be one of {' | '.join(PROFILES)}, got {cfg.profile!r}")
    if cfg.profile == "none":
        return {}
    if cfg.profile == "trace":
        return read_trace(Path(cfg.trace), clients)
    check_profile(DeviceProfile(cfg.speed, cfg.uplink, cfg.downlink, cfg.online), "federation.system")
    if cfg.profile == "uniform":
        return {c: DeviceProfile(cfg.speed, cfg.uplink, cfg.downlink, cfg.online) for c in range(clients)}
    return {c: mobile_profile(cfg, seed, c) for c in range(clients)}


def is_online(profile: DeviceProfile, seed: int, round_index: int, client_id: int, attempt: int = 0) -> bool:
    """Whether the client answers when sampled in this round (a draw from (seed, round, client))."""
    if profile.online >= 1:
        return True
    rng = np.random.default_rng([seed, round_index, client_id, 0x0FF1, attempt])
    return bool(rng.random() < profile.online)
