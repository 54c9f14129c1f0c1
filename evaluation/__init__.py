"""Everything from predictions to tables.

- ``metrics``: image- and pixel-level metrics (AUROC, AP, AUPRO, F1-max), chunked over large sets,
  their declaration (``METRICS``) and ``compute_metrics`` of a dataset's predictions;
- ``predict``: prediction over a dataset (``Predictions``, ``predict``, map storage), selection
  scoring and the few-shot memory bank;
- ``bootstrap``: bootstrap intervals over patients, patient-level figures, per-class metrics;
- ``calibration``: probabilities, operating points, Brier/ECE, reliability diagrams;
- ``maps_io``: saved test maps (``test.py --save_maps``);
- ``tables``: result tables (pipe tables, CSV, the paper's table);
- ``results``: test.py's figures per dataset and its results files (results.json, results.csv, ...).

Import the module you need: ``from evaluation import metrics``.
"""
