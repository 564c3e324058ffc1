"""Training runs: config, the loop shared by poetx and adamw, checkpoints, metrics, evaluation.

Modules: ``config`` (TrainConfig, TOML, presets' recipes), ``loop`` (``train``: set-up),
``trainer`` (``Trainer``: the capturable ``train_step`` and what runs between steps),
``parallel`` (torchrun process group, ``parallelize``: replicas or FSDP2), ``errors``, ``loss``
(``compute_loss``), ``evaluate``, ``schedule`` (warm-up + cosine), ``checkpoint`` (atomic,
verified safetensors checkpoints; a package by concern), ``metrics`` (metrics.jsonl,
TensorBoard, progress), ``device`` (device and dtype of a run), ``run_model`` (the model of a
run), ``run_dir`` (the run directory: layout, resume resolution, claiming it), ``saved_run``
(a run opened from disk for eval/export/plot).
"""
