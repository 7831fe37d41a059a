"""sbn-train's Hydra launchers: hydra-submitit-launcher's, with one submitit job per replica group
(:mod:`.group_launcher`). Hydra finds launchers only in its ``hydra_plugins`` namespace package; this folder
is that namespace's portion shipped by sbn-train (pyproject.toml lists ``hydra_plugins`` and this package)."""
