"""The analysis of a sweep: results (sweep dir -> DataFrame), stats (the decision rules), claims
(findings sentences), tables, figures, and the report that assembles them.

``results`` needs neither torch training nor Hydra's runtime; a report is rebuilt from stored
``metrics.json`` files without retraining.
"""
