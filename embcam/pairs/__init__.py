"""Pair explanations: explaining a pairs file (``explain``) and making one from a run
(``make``, ``embcam make-pairs``). The report's pairs section is ``embcam.report.pairs``."""
