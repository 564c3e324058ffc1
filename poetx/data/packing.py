"""Packing a token stream into fixed-length training windows, batched as a pure function of step."""

from __future__ import annotations

import numpy as np
import torch

_MASK32 = 2**32 - 1


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _gather(tokens: np.ndarray, windows: np.ndarray, window: int) -> torch.Tensor:
    """Rows ``tokens[w * window : (w + 1) * window]`` for each ``w`` in ``windows``, as int64."""
    index = windows.astype(np.int64)[:, None] * window + np.arange(window, dtype=np.int64)
    return torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))


class PackedBatches:
    """Shuffled batches of non-overlapping windows of ``seq_len + 1`` tokens.

    Window ``w`` is ``tokens[w * (seq_len + 1) : (w + 1) * (seq_len + 1)]``; a row's first
    ``seq_len`` tokens are the inputs and its last ``seq_len`` the labels (inputs shifted by one).
    The trailing ``len(tokens) % (seq_len + 1)`` tokens are never used.

    Samples are drawn epoch after epoch, each epoch a permutation of all windows seeded by
    ``(seed, epoch)``; step ``s`` takes samples ``s * batch_size`` to ``(s + 1) * batch_size - 1``
    of that sequence, so a batch may straddle two epochs and every window is used exactly once
    per epoch. ``batch(step)`` depends on nothing but ``(tokens, seq_len, batch_size, seed,
    step)``: a run resumed at step ``k`` sees the batches an unbroken run sees.

    Permutations use ``np.random.RandomState``, whose stream numpy keeps stable across versions.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        _check_positive("seq_len", seq_len)
        _check_positive("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self._window = seq_len + 1
        self._num_windows = len(tokens) // self._window
        if self._num_windows == 0:
            raise ValueError(
                f"{len(tokens)} tokens hold no window of seq_len + 1 = {self._window} tokens"
            )
        self._perms: dict[int, np.ndarray] = {}

    @property
    def num_windows(self) -> int:
        """Number of windows of ``seq_len + 1`` tokens in one epoch."""
        return self._num_windows

    @property
    def tokens_per_step(self) -> int:
        """Tokens predicted per step: ``batch_size * seq_len``."""
        return self.batch_size * self.seq_len

    @property
    def steps_per_epoch(self) -> float:
        """Steps to see every window once (fractional when batches straddle epochs)."""
        return self._num_windows / self.batch_size

    def epoch_and_offset(self, step: int) -> tuple[int, int]:
        """Epoch of the first sample of ``step``, and that sample's position in the epoch."""
        return divmod(step * self.batch_size, self._num_windows)

    def windows(self, step: int) -> np.ndarray:
        """Window indices of ``step``'s rows, shape ``(batch_size,)``."""
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        samples = int(step) * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(samples, self._num_windows)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            out[rows] = self._permutation(int(epoch))[offsets[rows]]
        return out

    def batch(self, step: int, rows: slice | None = None) -> torch.Tensor:
        """Rows of ``step``: a LongTensor of shape ``(batch_size, seq_len + 1)``.

        Inputs are ``batch[:, :-1]``, labels ``batch[:, 1:]``. ``rows`` gathers only those rows
        of the batch (a data-parallel rank's share), the same rows the full batch holds there.
        """
        windows = self.windows(step)
        return _gather(self.tokens, windows if rows is None else windows[rows], self._window)

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            seed_words = [self.seed & _MASK32, self.seed >> 32, epoch & _MASK32, epoch >> 32]
            perm = np.random.RandomState(seed_words).permutation(self._num_windows)
            # A run moves forward an epoch at a time; two cover a batch straddling epochs.
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm


def validation_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int
) -> list[torch.Tensor]:
    """A fixed held-out set: the first windows of ``tokens`` in order, unshuffled.

    Returns up to ``max_batches`` full LongTensors of shape ``(batch_size, seq_len + 1)``. When
    the stream holds fewer than ``batch_size`` windows, one smaller batch of all of them.

    Raises:
        ValueError: ``tokens`` holds no window of ``seq_len + 1`` tokens.
    """
    _check_positive("seq_len", seq_len)
    _check_positive("batch_size", batch_size)
    _check_positive("max_batches", max_batches)
    window = seq_len + 1
    num_windows = len(tokens) // window
    if num_windows == 0:
        raise ValueError(
            f"the validation stream has {len(tokens)} tokens, fewer than seq_len + 1 = {window}"
        )
    if num_windows < batch_size:
        return [_gather(tokens, np.arange(num_windows), window)]
    count = min(max_batches, num_windows // batch_size)
    return [
        _gather(tokens, np.arange(i * batch_size, (i + 1) * batch_size), window)
        for i in range(count)
    ]
