"""Everything from predictions to tables (and the few-shot support set that predictions depend on).

- ``metrics``: image- and pixel-level metrics (AUROC, AP, AUPRO, F1-max), chunked over large sets,
  their declaration (``METRICS``) and ``compute_metrics`` of a dataset's predictions;
- ``predict``: prediction over a dataset (``Predictions``, ``predict``, map storage in RAM or
  streamed to disk);
- ``selection``: train.py's checkpoint-selection score from each selection source's metrics;
- ``fewshot``: the support set at test time (the memory bank from its normal images, its images
  scored for calibration);
- ``bootstrap``: bootstrap intervals over patients, patient-level figures, per-class metrics;
- ``calibration``: probabilities, operating points, Brier/ECE, reliability diagrams;
- ``decisions``: a test run's calibration fitted on images it never tests (no stored one);
- ``maps_io``: saved test maps (``test.py --save_maps``);
- ``tables``: result tables (pipe tables, CSV, the paper's table);
- ``results``: test.py's metrics per dataset and its results files (results.json, results.csv, ...);
- ``figures``: test.py's figures of a dataset (overlays, ROC/PRO curves, reliability diagram).

Import the module you need: ``from evaluation import metrics``.
"""
