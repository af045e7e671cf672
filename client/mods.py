"""Flower mods around the train handler, each active only when the server's message asks for it:
Flower's `fixedclipping_mod` when the config holds a clip norm (client-level DP), Flower's
`secaggplus_mod` when the message is a SecAgg+ stage (secure aggregation). A plain round passes
straight through both."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from common.config import FedLoraConfig
from common.errors import FedLoraError
from common.flower_compat import (
    KEY_CLIPPING_NORM,
    SECAGG_RECORD_KEY_CONFIGS,
    ClientAppCallable,
    arrayrecord_to_parameters,
    fitres_to_recorddict,
)
from common.records import (
    ARRAY_NAMES_KEY,
    NUM_EXAMPLES,
    REPLY_NAMES_KEY,
    REPLY_PER_ROW_KEY,
    adapter_names,
    parameters_to_record,
    record_to_adapter,
    record_to_tensors,
)

LEGACY_ARRAYS, LEGACY_CONFIG = "fitins.parameters", "fitins.config"  # Flower's FitIns records


def client_dp_clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable
                           ) -> Message:
    if SECAGG_RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)

    def train_in_fedlora_records(legacy: Message, context: Context) -> Message:
        return _train_in_fedlora_records(legacy, context, call_next)

    return secaggplus_mod(msg, ctxt, train_in_fedlora_records)


def _train_in_fedlora_records(msg: Message, ctxt: Context, call_next: ClientAppCallable
                              ) -> Message:
    """SecAgg+ hands the train handler Flower's legacy FitIns and masks a legacy FitRes; the
    handler speaks named records. Translate both ways, and refuse what would not survive the
    protocol's fixed-point sum (a weight above max-weight, values outside the clipping range)."""
    cfg = FedLoraConfig.from_run_config(ctxt.run_config)
    config = ConfigRecord(dict(msg.content.config_records[LEGACY_CONFIG]))
    names = [str(name) for name in config.pop(ARRAY_NAMES_KEY)]
    order = ([str(name) for name in config.pop(REPLY_NAMES_KEY)] if REPLY_NAMES_KEY in config
             else adapter_names(names))
    per_row = bool(config.pop(REPLY_PER_ROW_KEY)) if REPLY_PER_ROW_KEY in config else False
    legacy_arrays = msg.content.array_records[LEGACY_ARRAYS]
    arrays = parameters_to_record(arrayrecord_to_parameters(legacy_arrays, keep_input=True),
                                  names)
    msg.content = RecordDict({"arrays": arrays, "config": config})
    reply = call_next(msg, ctxt)
    if reply.has_error():
        raise FedLoraError(reply.error.reason)
    records = reply.content
    if "arrays" not in records.array_records or len(records.metric_records) != 1:
        raise FedLoraError("the handler sent no arrays and metrics to aggregate")
    metrics = dict(next(iter(records.metric_records.values())))
    weight = 1 if cfg.client_level_dp else int(metrics[NUM_EXAMPLES])
    if weight > cfg.secagg_max_weight:
        raise FedLoraError(f"this site weighs {weight} training examples, more than "
                           f"secagg-max-weight ({cfg.secagg_max_weight:g}): raise it to at "
                           f"least {weight}")
    # The sum is of values, not of their transfer encoding (int8 + scales would not add up),
    # in the order the server asked for.
    if per_row:  # the protocol's weighted mean is then the sites' total / their rows
        state = {name: tensor.double() / weight
                 for name, tensor in record_to_tensors(records["arrays"]).items()}
    else:
        state = record_to_adapter(records["arrays"])
    if sorted(state) != sorted(order):
        raise FedLoraError("the handler's reply does not hold the arrays the server asked for")
    for name in order:
        peak = float(state[name].abs().max()) if state[name].numel() else 0.0
        if not np.isfinite(peak) or peak > cfg.secagg_clipping_range:
            raise FedLoraError(f"array {name!r} reaches {peak:.4g}, outside "
                               f"secagg-clipping-range ({cfg.secagg_clipping_range:g})")
    # float64: the mod shifts values by the clipping range and scales them to 2**30 before
    # rounding, which in float32 would lose ~6 of those bits. Only the masked integers travel.
    parameters = ndarrays_to_parameters([state[name].double().numpy() for name in order])
    reply.content = fitres_to_recorddict(FitRes(
        status=Status(Code.OK, "trained"), parameters=parameters, num_examples=weight,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))}),
        keep_input=False)
    return reply
