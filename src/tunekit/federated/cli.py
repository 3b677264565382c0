"""`tunekit federate --config FED.yaml [--rounds 2 --dp.epsilon 0.5 ...] [--resume] [--flower-venv DIR]`."""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, parse_value
from .aggregate import FederatedError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunekit federate", description=(
        "Federated fine-tuning of an adapter on Flower's Deployment Engine: a SuperLink and one SuperNode per "
        "data owner on loopback (or a running SuperLink given by `superlink: host:port`), each owner training "
        "tunekit's engine on its own file and sending only the adapter. Keys of FED.yaml can be overridden "
        "as --key value (e.g. --rounds 2 --aggregation ffa --training.method.r 8). See docs/scale-out.md."))
    p.add_argument("--config", required=True, help="the federation's YAML (federated/config.py documents it)")
    p.add_argument("--resume", action="store_true", help="continue after the last complete round in output_dir")
    p.add_argument("--flower-venv", default=None, help="venv with flwr (default: .flower-venv)")
    return p


def main(argv: list[str]) -> int:
    args, rest = build_parser().parse_known_args(argv)
    overrides = {}
    while rest:
        key = rest.pop(0)
        k, eq, inline = key[2:].partition("=")
        if not key.startswith("--") or not (eq or rest):
            print(f"tunekit federate: expected --key value pairs, got {key!r}", file=sys.stderr)
            return 2
        overrides[k] = parse_value(inline if eq else rest.pop(0))
    if args.resume:
        overrides["resume"] = True
    from .config import load_fed_config
    from .runtime import federate

    try:
        fed = load_fed_config(args.config, overrides)
        result = federate(fed, args.flower_venv)
    except (ConfigError, FederatedError) as e:
        print(f"tunekit federate: {e}", file=sys.stderr)
        return 2
    last = result["rounds"][-1] if result["rounds"] else {}
    print(f"federation done: {len(result['rounds'])} round(s) in {fed.output_dir}/rounds; last round "
          f"{last.get('round')}: owners {sorted(last.get('owners', {}))}, left out {len(last.get('left_out', []))}")
    dp = last.get("dp")
    if dp:
        print(f"local DP (Flower LocalDpMod, per owner): epsilon {dp['epsilon_per_round']:g}, delta "
              f"{dp['delta_per_round']:g} per round; over {last['round']} rounds at most epsilon "
              f"{dp['epsilon_total']:g}, delta {dp['delta_total']:g} (basic composition)")
    return 0
