"""Running Flower's processes for ``flower-server`` and ``flower-client``: addresses, TLS
material, the generated Flower app and run config, the SuperLink process tree, health
checks and the ``flwr`` CLI (:mod:`.deployment`)."""
