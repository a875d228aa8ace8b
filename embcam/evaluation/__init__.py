"""Evaluating the heatmap method, beyond the job's own metrics: the Chen et al. baseline
(``chen``, ``embcam chen-baseline``) and the sanity and faithfulness checks (``sanity``,
``saliency_checks``, ``embcam sanity``)."""
