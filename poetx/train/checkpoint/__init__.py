"""Checkpoints: one folder per step, written atomically, verified by a manifest on load.

Layout of ``RUN_DIR/checkpoints/step_00000300/``::

    model.safetensors      model.state_dict() (W0, skew parameters, permutations, merge counters,
                           ordinary weights); a tensor shared by several names (tied embeddings)
                           is stored once, the other names listed as aliases in the metadata
    optimizer.safetensors  optimizer state tensors under "state.<param index>.<name>"
    rng.safetensors        torch CPU / CUDA generator states, numpy's key array
    state.json             step, run config, data position, lr scheduler, merge schedule,
                           optimizer param groups, python / numpy RNG scalars
    manifest.json          size and sha256 of each file above; written last

A sharded (FSDP2) run writes ``sharded/`` (torch.distributed.checkpoint: one ``.distcp`` file
per process and ``.metadata``) instead of the two tensor files; its manifest lists every shard.
It loads on any number of processes, sharded or not (``sharded``).

No tensor is ever pickled. Modules by concern: ``format`` (file names, manifest, reading and
verifying), ``store`` (atomic save, pruning, stale temporaries), ``model_state``,
``optimizer_state``, ``sharded`` and ``rng`` (what goes into the files and back), ``resume`` (which
checkpoint a resumed run or ``eval`` / ``export`` uses).
"""

from poetx.train.checkpoint.format import (
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    REQUIRED_FILES,
    RNG_FILE,
    STATE_FILE,
    CheckpointError,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    read_state,
    read_tensors,
    verify_checkpoint,
)
from poetx.train.checkpoint.model_state import (
    checkpoint_vocab_size,
    dedup_tensors,
    load_model_state,
    model_tensor_names,
    read_model_tensors,
)
from poetx.train.checkpoint.optimizer_state import load_optimizer_state
from poetx.train.checkpoint.resume import resolve_checkpoint, resolve_resume
from poetx.train.checkpoint.rng import restore_rng
from poetx.train.checkpoint.store import (
    clean_stale,
    prune_checkpoints,
    save_checkpoint,
    save_sharded_checkpoint,
)

__all__ = [
    "MANIFEST_FILE", "MODEL_FILE", "OPTIMIZER_FILE", "REQUIRED_FILES", "RNG_FILE", "STATE_FILE",
    "CheckpointError", "checkpoint_name", "checkpoint_vocab_size", "clean_stale",
    "dedup_tensors", "latest_checkpoint", "list_checkpoints", "load_model_state",
    "load_optimizer_state", "model_tensor_names", "prune_checkpoints", "read_model_tensors",
    "read_state", "read_tensors",
    "resolve_checkpoint", "resolve_resume", "restore_rng", "save_checkpoint",
    "save_sharded_checkpoint", "verify_checkpoint",
]
