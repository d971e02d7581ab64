"""``keel bench``: keel side by side with a bare proxy from the same stack (and the peers).

``_bare`` is the floor, ``_targets`` starts the processes, ``_load``/``_hold`` generate load,
``_measure`` reads /proc, ``_cells`` measures, ``_report`` prints and writes, ``_cli`` runs it.
"""
