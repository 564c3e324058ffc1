"""Training runs: config, the loop shared by poetx and adamw, checkpoints, metrics, evaluation.

Modules: ``config`` (TrainConfig, TOML, presets' recipes), ``loop`` (``train``), ``loss``
(``compute_loss``), ``evaluate``, ``schedule`` (warm-up + cosine), ``checkpoint`` (atomic,
verified safetensors checkpoints), ``metrics`` (metrics.jsonl, TensorBoard, progress bar),
``runs`` (devices, the model of a run, loading a run for eval/export/plot).
"""
