"""Entry points: ``train``, ``sample`` and ``evaluate`` (Hydra apps), shimmed by the root scripts."""
