"""What the server and the client apps share, as Flower's app templates keep it in
``task.py``: the run configuration (:mod:`.config`), data loading and partitioning
(:mod:`.data`), and local training and evaluation (:mod:`.training`)."""
