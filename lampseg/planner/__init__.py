"""The planner: decides how a run is split and how large its inputs may be, from measured or estimated
costs; the engines (``lampseg.parallel``) run what it decides.

- ``profile``: per-block time, saved activations and state of the U-Net (``model.blocks``), measured or on
  meta tensors;
- ``plan``: pipeline stages that fit a memory budget (the memory and time model);
- ``capacity``: slab costs of the spatial split, SP x PP, the capacity table and ``parallel=auto``'s choice;
- ``patch``: ``data.patch_size=auto``; ``inference``: whole volume, split or sliding windows at inference;
- ``layout``: the decisions a run asks for (``plan_split``, ``auto_layout``, ``preflight_plan``).
"""
