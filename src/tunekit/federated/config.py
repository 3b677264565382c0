"""The federation's config (FED.yaml): who takes part, how many rounds, how the server aggregates, DP.

    output_dir: runs/fed            # the server's run folder: one checkpoint per round, result.json
    rounds: 3
    local_steps: 10                 # optimizer steps each owner trains per round (tunekit's engine)
    aggregation: svd                # fedavg | ffa | svd  (aggregate.py)
    min_owners: 2                   # a round with fewer replies fails; more may drop out
    owners:                         # one SuperNode each, started on loopback by `tunekit federate`
      - {name: north, data: data/north.jsonl}
      - {name: south, data: data/south.jsonl}
    dp: {epsilon: 0.5, delta: 1.0e-5, clip: 0.1}   # optional: Flower's LocalDpMod on every owner
    training:                       # a tunekit training config (model, data, method, optim, train)
      model: {name: smollm2-135m}
      method: {name: lora, r: 8}

`training.data.train` and `training.train.output_dir`/`max_steps` are set per owner and round; the other
training keys mean what they mean for `tunekit train`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import Config, ConfigError
from .aggregate import AGGREGATIONS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Owner(Section):
    name: str = Field(description="The data owner's name (its SuperNode's node config `owner`).")
    data: str = Field(description="Its training file, read only by its own SuperNode; it never leaves it.")


class DpConfig(Section):
    epsilon: float = Field(gt=0, description="Privacy budget per round and owner of Flower's LocalDpMod (Gaussian "
                           "mechanism; its formula holds for epsilon < 1).")
    delta: float = Field(1e-5, gt=0, lt=1, description="Failure probability per round and owner.")
    clip: float = Field(gt=0, description="L2 norm each owner's update (trained - global) is clipped to; also the "
                        "mechanism's sensitivity (one owner's whole update added or removed).")


class FedConfig(Section):
    output_dir: str = Field("runs/federated", description="Server run folder: rounds/round-NNNN, result.json.")
    rounds: int = Field(3, ge=1, description="Federated rounds.")
    local_steps: int = Field(10, ge=1, description="Optimizer steps each owner trains per round.")
    aggregation: Literal[AGGREGATIONS] = Field("svd", description="fedavg (A, B averaged: FlowerTune's baseline), "
                                               "ffa (A frozen, B averaged: exact), svd (mean of B A, re-factored).")
    min_owners: int = Field(1, ge=1, description="Replies a round needs; owners that fail or time out are "
                            "left out of that round.")
    round_timeout_s: float = Field(3600.0, gt=0, description="Seconds the server waits for a round's replies.")
    superlink: str | None = Field(None, description="host:port of a running SuperLink to submit the run to "
                                  "(its owners' SuperNodes started by them); null: start one and one SuperNode per "
                                  "owner on loopback.")
    insecure: bool = Field(True, description="Plain HTTP to the SuperLink (loopback); false: TLS with "
                           "root_certificates.")
    root_certificates: str | None = Field(None, description="CA certificate (PEM) of a TLS SuperLink.")
    owners: list[Owner] = Field(default_factory=list, description="Data owners (loopback mode: one SuperNode each).")
    dp: DpConfig | None = Field(None, description="Local differential privacy on every owner (LocalDpMod).")
    eval_file: str | None = Field(None, description="A held-out file on the server: the global adapter's loss on "
                                  "it after every round goes into round.json (eval_loss).")
    resume: bool = Field(False, description="Continue from the last complete round in output_dir.")
    training: dict[str, Any] = Field(default_factory=dict, description="tunekit training config (see module doc).")

    @field_validator("owners")
    @classmethod
    def _distinct(cls, owners: list[Owner]) -> list[Owner]:
        names = [o.name for o in owners]
        if len(set(names)) != len(names):
            raise ValueError(f"owner names must be distinct, got {names}")
        return owners

    def training_config(self) -> Config:
        """The validated tunekit config every owner trains with (errors name the `training.` key)."""
        from ..config import _format_validation_error

        try:
            return Config.model_validate(self.training)
        except ValidationError as e:
            text = _format_validation_error(e, "FED.yaml, under training:").replace("\n  ", "\n  training.")
            raise ConfigError(text) from None


def load_fed_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> FedConfig:
    """FED.yaml plus dotted overrides ({'rounds': 2, 'dp.epsilon': 0.5}); unknown keys name the valid ones."""
    from ..config import set_dotted

    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"federation config not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    try:
        cfg = FedConfig.model_validate(tree)
    except ValidationError as e:
        lines = [f"invalid federation config ({path or 'flags'}):"]
        for err in e.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = f"unknown key; valid keys: {', '.join(FedConfig.model_fields)}"
            lines.append(f"  {'.'.join(str(p) for p in err['loc'])}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    if cfg.superlink is None and not cfg.owners:
        raise ConfigError("federation config: list the data owners under `owners:` (name, data), or give "
                          "`superlink: host:port` of a running SuperLink whose owners started their SuperNodes")
    if cfg.dp is not None and cfg.aggregation == "ffa":
        raise ConfigError("dp with aggregation ffa: LocalDpMod clips and noises every tensor the server sent, FFA's "
                          "frozen A included; use aggregation fedavg or svd with dp")
    if cfg.min_owners > len(cfg.owners) and cfg.superlink is None:
        raise ConfigError(f"min_owners {cfg.min_owners} is more than the {len(cfg.owners)} owners listed")
    cfg.training_config()  # validate now, before any process starts
    return cfg
