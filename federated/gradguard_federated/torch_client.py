"""The ClientApp's handlers for the user's own PyTorch model (run config `torch-model`): the
client trains the `nn.Module` with torch on its own data (node config `data-dir`), then releases
the round's mean gradient only as its policy allows, through `gradguard.wrap(...).release`
(the engine's explicit release, as the tch-side client's `Guard::release`). The reply has the
layout of client_app.py's, so the server verifies and aggregates it as any other.

What is released: `(w_global - w_local) / (lr * local_steps)` per parameter after plain SGD, the
mean of the local mini-batch gradients (docs/FEDERATED.md). The guard measures it on the round's
samples at the global parameters (what the server knows), with the attribute for M2. As the
tch-side client: the guard goes on across rounds and restarts from the state saved beside the
node's audit log (else `Context.state`), and vets the round's global model on the first batch
before training on it (a refused reply when it fails).
"""

from __future__ import annotations

import copy
import json
import logging

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from .task import ARRAYS_KEY, GUARD_KEY, METRICS_KEY, STATE_KEY, to_record
from .torch_task import load_model, load_parameters, node_data

LOG = logging.getLogger("flwr")


def batches(n: int, steps: int, batch_size: int, seed: int) -> list:
    """The round's mini-batches (sample indices), drawn with a seeded generator before training:
    the first is the one the global model is vetted on."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n, (min(batch_size, n),), generator=g) for _ in range(steps)]


def local_training(model, x, y, lr: float, drawn: list):
    """Plain SGD over the drawn mini-batches; the samples used (indices) and the mean training
    loss."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    total = 0.0
    for idx in drawn:
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return torch.unique(torch.cat(drawn)), total / len(drawn)


def _refused(msg: Message, vetting, server_round: int, metrics: dict, record: dict) -> Message:
    """The reply to a global model that failed the node's vetting: nothing was trained on it and
    nothing leaves but why (the layout of client_app.py's refused reply)."""
    record.update({"status": "refused", "kind": "refused", "manifest": "", "reason": vetting.reason, "vetting": json.dumps(vetting.report)})
    metrics.update({"num-examples": 0, "blocked": 1, "refused": 1, "train-loss": 0.0, "local-steps": 0, "released-layers": 0, "withheld-layers": 0})
    LOG.warning("gradguard: round %d global model %s", server_round, vetting.reason)
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics), GUARD_KEY: ConfigRecord(record)}), reply_to=msg)


def train(msg: Message, context: Context, settings, params: dict, config: dict) -> Message:
    """The guarded local round on the node's own data with the run's PyTorch model: the guard
    goes on from the state the node kept (beside its audit log, else Context.state), vets the
    global model on the round's first batch before training on it, releases the round's mean
    gradient under the policy and saves its state before the reply leaves."""
    import torch
    import torch.nn.functional as F

    import gradguard

    spec = str(context.run_config["torch-model"])
    if settings.data_dir is None:
        raise gradguard.ConfigError("torch-model needs the node's own data (node config data-dir: x.npy, y.npy)")
    (x, y, a), _ = node_data(settings.data_dir, settings.test_fraction, settings.data_seed)
    lr, steps = float(config.get("lr", 0.1)), int(config.get("local-steps", 1))
    batch_size, seed = int(config.get("batch-size", 32)), int(config.get("seed", 0))
    server_round = int(config.get("server-round", 0))

    global_model = load_model(spec)
    load_parameters(global_model, params)
    # The guard over the global model: what the server knows; it measures on the round's samples.
    global_model.train()
    saved = context.state.config_records.get(STATE_KEY)
    with gradguard.wrap(
        global_model,
        torch.optim.SGD(global_model.parameters(), lr=0.0),  # never stepped: the explicit form
        lambda inputs, targets: F.cross_entropy(global_model(inputs), targets),
        policy=settings.policy_path,
        audit_log=None if settings.audit_log is None else str(settings.audit_log),
        state=None if saved is None else json.loads(str(saved["state"])),
    ) as guard:
        record = {"policy-hash": guard.policy_hash, "partition-id": settings.partition_id, "state-origin": guard.state_origin}
        metrics = {"lr": lr, "partition-id": settings.partition_id}
        drawn = batches(len(y), steps, batch_size, seed + 1000 * server_round + settings.partition_id)
        # Parameters this node did not train are vetted on its first batch before anything is
        # trained or released on them.
        vetting = guard.vet(x[drawn[0]], y[drawn[0]])
        if not vetting.accepted:
            record["step"] = guard.steps
            return _refused(msg, vetting, server_round, metrics, record)

        local = copy.deepcopy(global_model)
        used, train_loss = local_training(local, x, y, lr, drawn)
        with torch.no_grad():
            update = {n: (p_g - p_l) / (lr * steps) for (n, p_g), (_, p_l) in zip(global_model.named_parameters(), local.named_parameters())}
        release = guard.release(update, x[used], y[used], attribute=None if a is None else a[used])
        # On disk (its hash in the log) before the update can leave: a node that dies after this
        # goes on from here, with this release counted.
        guard.save_state()
        context.state.config_records[STATE_KEY] = ConfigRecord({"state": json.dumps(guard.state()), "round": server_round})

    manifest = release.report["release"]
    released = [l["name"] for l in manifest["layers"] if l["released"]]
    withheld = [l["name"] for l in manifest["layers"] if not l["released"]]
    record.update({
        "status": "blocked" if release.blocked else "released",
        "kind": "blocked" if release.blocked else gradguard.fl.release_kind(json.dumps(manifest)),
        "manifest": json.dumps(manifest),
        "step": int(manifest["step"]),
    })
    metrics.update({
        "num-examples": int(len(used)),
        "blocked": int(release.blocked),
        "train-loss": float(train_loss),
        "local-steps": steps,
        "released-layers": len(released),
        "withheld-layers": len(withheld),
    })
    if release.blocked:
        record["reason"] = release.reason
        return Message(RecordDict({METRICS_KEY: MetricRecord(metrics), GUARD_KEY: ConfigRecord(record)}), reply_to=msg)
    record["report"] = gradguard.fl.shared_report(json.dumps(release.report), released)
    arrays = {n: t.detach().cpu().numpy() for n, t in release.update.items()}
    content = RecordDict({ARRAYS_KEY: to_record(arrays), METRICS_KEY: MetricRecord(metrics), GUARD_KEY: ConfigRecord(record)})
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context, settings, params: dict) -> Message:
    """Accuracy and loss of the global model on the node's held-out data."""
    import torch
    import torch.nn.functional as F

    model = load_model(str(context.run_config["torch-model"]))
    load_parameters(model, params)
    _, (xt, yt) = node_data(settings.data_dir, settings.test_fraction, settings.data_seed)
    model.eval()
    with torch.no_grad():
        out = model(xt)
        values = {
            "loss": float(F.cross_entropy(out, yt)),
            "accuracy": float((out.argmax(1) == yt).float().mean()),
            "num-examples": int(len(yt)),
            "partition-id": settings.partition_id,
        }
    return Message(RecordDict({METRICS_KEY: MetricRecord(values)}), reply_to=msg)
