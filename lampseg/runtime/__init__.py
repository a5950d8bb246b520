"""Helpers every layer above may use: devices, dtypes and autocast, seeding (``device``); memory probes and
units (``memory``)."""
