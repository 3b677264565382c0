"""Federated fine-tuning of adapters across data owners that keep their data (issue 22, on Flower).

    config.py      FED.yaml: owners, rounds, local steps, aggregation, min owners, DP, the training config
    aggregate.py   fedavg / ffa / svd of the owners' LoRA tensors, weighted by examples (no Flower needed)
    local.py       one owner's round: tunekit's engine started from the global adapter (FFA: A frozen)
    rounds.py      per-round checkpoints and resume
    runtime.py     `tunekit federate`: SuperLink, one SuperNode per owner, `flwr run` (Flower's own venv)
    server_app.py  the Flower ServerApp (imports flwr: runs in Flower's venv only)
    client_app.py  the Flower ClientApp with LocalDpMod (imports flwr: runs in Flower's venv only)

docs/scale-out.md describes the commands, the measurements and what remains.
"""

from .aggregate import AGGREGATIONS, ClientUpdate, FederatedError, aggregate, product_bias

__all__ = ["AGGREGATIONS", "ClientUpdate", "FederatedError", "aggregate", "product_bias"]
