"""The one exception type users see: its message is a complete, one-line explanation."""


class FedLoraError(Exception):
    """Bad input (config, data, model, a peer's message). The CLI prints it as one line."""
