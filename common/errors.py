"""The one exception type users see: its message is a complete, one-line explanation."""


class FedLoraError(Exception):
    """Bad input (config, data, model, a peer's message). The CLI prints it as one line."""


# A site refusing to train because DP-SGD would exceed dp-target-epsilon says this in its error;
# the server ends the run cleanly when too few sites are left to train.
PRIVACY_BUDGET_REACHED = "privacy budget reached"
