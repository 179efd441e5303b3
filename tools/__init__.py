"""The ``otfusion`` command (:mod:`.cli`: demo, fuse, lmc) and what it runs: the
comparison of fusion methods on trained clients (:mod:`.comparison`) and the
linear-mode-connectivity barrier (:mod:`.lmc`)."""
