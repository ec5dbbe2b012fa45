"""The analysis of a sweep: results (sweep dir -> DataFrame), stats (the decision rules), claims
(findings sentences), tables, figures, and the report that assembles them; for a v2 study
(sibling sweeps with per-sample predictions): study (the frame and its cells), significance (the
tests), cells (intervals, recommendations), study_claims, headline (figures), study_report.

``results`` needs neither torch training nor Hydra's runtime; a report is rebuilt from stored
``metrics.json`` files without retraining.
"""
