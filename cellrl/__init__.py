"""cellrl: plan TF knockout/overexpression sequences that turn one cell type into another.

Stages (one module each): ``synthetic`` (demo atlas), ``ingest``, ``preprocess`` (filter), ``split``,
``grn`` (base GRN), ``oracle`` (CellOracle fit -> portable model), ``transitions`` (next-cell table),
``env`` (gymnasium environment), ``train`` (MaskablePPO), ``hpo`` (Optuna), ``bfs`` (exact shortest
paths), ``evaluate`` (agent vs baselines), ``report`` (plots + HTML), ``cli`` (``cellrl plan``).
"""

__version__ = "0.1.0"
