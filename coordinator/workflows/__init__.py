"""Every job kind: the public API (api.py) and the multi-stage, models x sources and in-context runs."""
