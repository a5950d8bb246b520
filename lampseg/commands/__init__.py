"""The subcommands that are not a training run, a study or a benchmark: ``plan``, ``validate``,
``visualize``, ``evaluate``, ``predict``, ``export`` (``__main__.RUNNERS`` names each one's function)."""
