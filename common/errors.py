"""The one exception type users see: its message is a complete, one-line explanation."""


class FedLoraError(Exception):
    """Bad input (config, data, model, a peer's message). The CLI prints it as one line."""


def first_line(err: BaseException) -> str:
    """A library's error, shortened to what fits in a one-line FedLoraError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# A site refusing to train because DP-SGD would exceed dp-target-epsilon says this in its error;
# the server ends the run cleanly when too few sites are left to train.
PRIVACY_BUDGET_REACHED = "privacy budget reached"
