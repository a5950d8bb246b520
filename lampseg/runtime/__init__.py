"""Helpers every layer above may use: devices, ``trainer.precision`` (``auto`` resolved from the hardware),
dtypes and autocast, seeding (``device``); memory probes and units (``memory``); local processes as /proc
shows them (``processes``); the one launcher of every multi-process job, loopback-bound, ended whole on a
timeout (``launcher``)."""
