"""Running Flower's processes for ``flower-server`` and ``flower-client``. The deployment
mode of flower-server (:mod:`.deployment`: a SuperLink, this app, one run of it) is built
on small modules: addresses (:mod:`.addresses`), transport security (:mod:`.security`),
the files of the state directory (:mod:`.state_files`: the generated Flower App, the
connection, the run config), process trees (:mod:`.processes`), the SuperLink
(:mod:`.superlink`), the ``flwr`` CLI (:mod:`.flwr_cli`), and the errors and messages
shown to the user (:mod:`.errors`)."""
