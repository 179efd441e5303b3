"""The ClientApp used by simulated and real clients (:mod:`.app`), the legacy
NumPyClient (:mod:`.legacy`) and the ``flower-client`` command."""
