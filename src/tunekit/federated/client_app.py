"""The Flower ClientApp: one data owner's round on its own SuperNode, with its own data file.

The SuperNode's node config names the owner and its file (`--node-config 'owner="north"
data-file="/data/north.jsonl"'`, optional `work-dir`); the file is read here and nothing of it is sent: the reply
holds the trained tensors (fp32), the number of training examples and the last training loss. With `dp` in the
federation's config, Flower's LocalDpMod clips the update (trained - global) to `dp.clip` and adds Gaussian noise
for (`dp.epsilon`, `dp.delta`) per round before the reply leaves the SuperNode.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod

from .aggregate import FederatedError
from .config import FedConfig
from .local import last_loss, local_config, train_round


def owner_files(context: Context) -> tuple[str, Path, Path]:
    """(owner, data file, work folder) from the SuperNode's node config; a missing file names what to set."""
    cfg = context.node_config
    owner = str(cfg.get("owner", f"node-{context.node_id}"))
    if "data-file" not in cfg:
        raise FederatedError(f"owner {owner!r}: its SuperNode has no data-file in --node-config; start it with "
                             f"--node-config 'owner=\"{owner}\" data-file=\"/path/to/train.jsonl\"'")
    data = Path(str(cfg["data-file"]))
    if not data.is_file():
        raise FederatedError(f"owner {owner!r}: data file {data} does not exist on this SuperNode; fix data-file in "
                             f"its --node-config (or `owners:` in FED.yaml)")
    work = Path(str(cfg.get("work-dir", Path(tempfile.gettempdir()) / f"tunekit-owner-{owner}")))
    return owner, data, work


def dp_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's LocalDpMod with the federation's (clip, epsilon, delta); a no-op without `dp`."""
    fed = FedConfig.model_validate_json(str(context.run_config["fed-config"]))
    if fed.dp is None:
        return call_next(msg, context)
    return LocalDpMod(fed.dp.clip, fed.dp.clip, fed.dp.epsilon, fed.dp.delta)(msg, context, call_next)


app = ClientApp(mods=[dp_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    owner, data, work = owner_files(context)
    config = msg.content["config"]
    number = int(config["round"])
    cfg = local_config(json.loads(str(config["training"])), data, work, number, int(config["local-steps"]))
    start = {n: t.float() for n, t in msg.content["adapter"].to_torch_state_dict().items()}
    result = train_round(cfg, start, str(config["aggregation"]))
    trained = {n: result.trained[n] for n in start if n in result.trained}  # the server's order (LocalDpMod)
    loss = last_loss(Path(cfg.train.output_dir))
    return Message(RecordDict({
        "adapter": ArrayRecord(trained),
        "metrics": MetricRecord({"num-examples": result.n_examples, "train-loss": loss}),
        "owner": ConfigRecord({"owner": owner}),
    }), reply_to=msg)
