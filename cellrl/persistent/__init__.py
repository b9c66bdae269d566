"""Persistent perturbations: the state is (cell, applied set), simulated on the fly (issue 14).

* :mod:`cellrl.persistent.engine`: batched multi-gene CellOracle simulation (``PersistentEngine``);
* :mod:`cellrl.persistent.env`: the environment (``env.perturbation_model: persistent``);
* :mod:`cellrl.persistent.search`: greedy, beam and exact search over sets (the baselines).
"""
