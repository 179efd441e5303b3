"""The ServerApp (:mod:`.app`, :mod:`.legacy_app`), per-round checkpoints, the run report
and the ``flower-server`` command."""
