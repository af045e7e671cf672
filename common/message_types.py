"""The message types fedlora's ServerApp sends beyond Flower's train and evaluate. Imports
nothing: the light ClientApp (client/entry.py) registers its handlers with them."""

HEAD_STATISTICS = "query.head_statistics"  # the message a site answers with head statistics
HEAD_ACTION = "head_statistics"  # its action name (Flower: a Python identifier)
