"""The runs that write a run folder: ``embcam explain`` (the Ray Data job: ``pipeline``
wires the per-batch work of ``stages``, ``tasks`` and ``model_stage``, which never import
Ray) and ``embcam reexplain`` (from stored maps, no model, no Ray), with the run's life
(``lifecycle``)."""
