"""Federated fine-tuning of adapters across data owners that keep their data (issue 22, on Flower).

What exists: aggregate.py, the server-side aggregation of the owners' adapters (FedAvg of A and B, FFA-LoRA,
averaging the products B A and re-factoring by SVD), with the bias of the naive FedAvg measured against it. The
Flower SuperLink/SuperNode runtime (`tunekit federate`) is not here yet: docs/scale-out.md says why and what
remains.
"""

from .aggregate import AGGREGATIONS, ClientUpdate, FederatedError, aggregate, product_bias

__all__ = ["AGGREGATIONS", "ClientUpdate", "FederatedError", "aggregate", "product_bias"]
