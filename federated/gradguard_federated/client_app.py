"""The ClientApp: a client trains the run's model (the digits CNN, the TorchScript file of run
config `model-path`, or the user's own PyTorch module of run config `torch-model`, trained with
torch: torch_client.py) on its own data (node config `data-dir`, else its digits partition)
and releases only what its privacy policy allows, decided by gradguard's `Guard::release`
inside the Rust extension. The guard remembers across rounds and restarts: its state
(protection levels, step count, M5 ledger) is kept in `Context.state` and on disk beside the
node's audit log (node config `audit-log`; `<audit-log>.state.json`, its hash in the log), and
restored each round; a SuperNode started again goes on from the file (a `restarted` record).
A state that cannot be vouched for (missing after a logged save, rolled back, unreadable) is
an error reply naming the file, every round, until an operator runs `gradguard log
reset-state`.

Reply to a train message (`RecordDict`):
- released: "arrays" (ArrayRecord: the protected update, released layers only), "metrics"
  (MetricRecord: num-examples, train-loss, blocked=0, ...), "gradguard" (ConfigRecord: status
  "released", manifest JSON, the shared report JSON, policy hash, partition id);
- blocked: no ArrayRecord at all; "metrics" (blocked=1) and "gradguard" (status "blocked", the
  reason, the manifest: decisions and metric values, no gradient value);
- refused: the round's global model failed the node's vetting (non-finite parameters, a sample
  isolation rule, or the analytic attacks on the node's first batch), checked before anything
  was trained on it: no ArrayRecord; "gradguard" (status "refused", the reason, the vetting
  JSON), "metrics" (refused=1, blocked=1);
- bad input (parameters, config, data, policy): an error reply (`Message(Error(...))`) whose
  reason names the problem. The SuperNode keeps serving later rounds either way.
"""

from __future__ import annotations

import logging
import traceback

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import gradguard_fl

from . import torch_client
from .task import (
    ARRAYS_KEY,
    CONFIG_KEY,
    GUARD_KEY,
    METRICS_KEY,
    STATE_KEY,
    NodeConfigError,
    ensure_metrics_server,
    model_config,
    node_settings,
    spool_report,
    to_numpy,
    to_record,
)

LOG = logging.getLogger("flwr")

# ErrorCode.CLIENT_APP_RAISED_EXCEPTION: the ClientApp refused the message.
ERROR_CODE = 2

app = ClientApp()


class BadMessage(ValueError):
    """The server's message lacks what the handler needs."""


def _error_reply(msg: Message, error: Exception, context: Context) -> Message:
    kind = type(error).__name__
    reason = f"gradguard client (node {context.node_id}): {kind}: {error}"
    LOG.error("%s", reason)
    return Message(Error(code=ERROR_CODE, reason=reason), reply_to=msg)


def _inputs(msg: Message) -> tuple[dict, dict]:
    content = msg.content
    if ARRAYS_KEY not in content.array_records:
        raise BadMessage(f"the message carries no ArrayRecord {ARRAYS_KEY!r} (global parameters)")
    params = to_numpy(content.array_records[ARRAYS_KEY])
    config = dict(content.config_records[CONFIG_KEY]) if CONFIG_KEY in content.config_records else {}
    return params, config


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One guarded local training step: train, release under the policy, reply."""
    try:
        settings = node_settings(context.node_config, context.run_config, context.node_id, context.run_id)
        params, config = _inputs(msg)
        if "policy" in config or "policy-path" in config or "policy_path" in config:
            raise gradguard_fl.ConfigError(
                "the server cannot set a client's privacy policy: the client enforces its own "
                "(node config `policy`, else the run's `default-policy`)"
            )
        if "model-path" in config or "loss" in config:
            raise gradguard_fl.ConfigError("the model comes from the run config (model-path, loss), not the round's config")
        if context.run_config.get("torch-model"):
            # The user's own nn.Module, trained with torch and released through gradguard.wrap.
            return torch_client.train(msg, context, settings, params, config)
        config["policy-path"] = settings.policy_path
        config.update(model_config(context.run_config))
        server_round = int(config.get("server-round", 0))
        saved = context.state.config_records.get(STATE_KEY)
        result = gradguard_fl.train(
            params,
            config,
            settings.data(),
            state=str(saved["state"]) if saved is not None else None,
            audit_log=str(settings.audit_log),
        )
        # Round r+1 starts where round r ended (levels, hysteresis, step count).
        context.state.config_records[STATE_KEY] = ConfigRecord({"state": result.state, "round": server_round})
    except (gradguard_fl.GradguardError, NodeConfigError, BadMessage) as error:
        return _error_reply(msg, error, context)
    except Exception as error:  # noqa: BLE001 - every failure becomes a reply, never a crash
        LOG.error("%s", traceback.format_exc())
        return _error_reply(msg, error, context)

    # The node's own /metrics sees every release, blocked ones included (full local report).
    try:
        ensure_metrics_server(settings, model_config(context.run_config)["model-path"])
        if result.report:  # a refused round computed nothing to report
            spool_report(settings, result.report, server_round)
    except OSError as error:
        LOG.warning("gradguard: node metrics unavailable: %s", error)

    guard = {
        "status": "refused" if result.refused else "blocked" if result.blocked else "released",
        "kind": result.kind,
        "manifest": result.manifest,
        "policy-hash": result.policy_hash,
        "partition-id": settings.partition_id,
        "step": result.step,
        "state-origin": result.state_origin,
    }
    metrics = {
        "num-examples": result.num_examples,
        "blocked": int(result.blocked),
        "train-loss": float(result.train_loss),
        "local-steps": result.local_steps,
        "lr": float(result.lr),
        "partition-id": settings.partition_id,
        "released-layers": len(result.released_layers),
        "withheld-layers": len(result.withheld_layers),
    }
    if result.refused:
        # Nothing was trained on the global model, nothing leaves but why.
        guard["reason"] = result.reason
        guard["vetting"] = result.vetting
        metrics["refused"] = 1
        LOG.warning("gradguard: round %d global model %s", server_round, result.reason)
        content = RecordDict({METRICS_KEY: MetricRecord(metrics), GUARD_KEY: ConfigRecord(guard)})
    elif result.blocked:
        # Nothing of the update leaves: no arrays, no report (its statistics describe the update).
        guard["reason"] = result.reason
        LOG.warning("gradguard: round %d release blocked: %s", server_round, result.reason)
        content = RecordDict({METRICS_KEY: MetricRecord(metrics), GUARD_KEY: ConfigRecord(guard)})
    else:
        guard["report"] = result.shared_report
        LOG.info(
            "gradguard: round %d released %s, withheld %s",
            server_round,
            result.released_layers,
            result.withheld_layers,
        )
        content = RecordDict(
            {
                ARRAYS_KEY: to_record(result.update),
                METRICS_KEY: MetricRecord(metrics),
                GUARD_KEY: ConfigRecord(guard),
            }
        )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the global model on the held-out digits with this client's label mix."""
    try:
        settings = node_settings(context.node_config, context.run_config, context.node_id, context.run_id)
        params, _ = _inputs(msg)
        if context.run_config.get("torch-model"):
            return torch_client.evaluate(msg, context, settings, params)
        model = model_config(context.run_config)
        scores = gradguard_fl.evaluate(params, settings.data(), model_path=model["model-path"], loss=model["loss"])
    except (gradguard_fl.GradguardError, NodeConfigError, BadMessage) as error:
        return _error_reply(msg, error, context)
    except Exception as error:  # noqa: BLE001
        LOG.error("%s", traceback.format_exc())
        return _error_reply(msg, error, context)
    values = {
        "loss": float(scores["loss"]),
        "num-examples": int(scores["num_examples"]),
        "partition-id": settings.partition_id,
    }
    if scores["accuracy"] is not None:  # None for mse
        values["accuracy"] = float(scores["accuracy"])
    return Message(RecordDict({METRICS_KEY: MetricRecord(values)}), reply_to=msg)

