"""``poetx plot``: training loss and validation perplexity of several runs, and weight spectra.

Writes into ``PNG_DIR``:
    ``loss.png``      train loss against step (raw, faint, and smoothed), one colour per run
    ``val_ppl.png``   validation perplexity against step (log scale)
    ``spectrum_<run>.png``  singular values of a few layers from the run's newest checkpoint:
        for poetx runs from the effective weights ``R W0 P``, next to the spectrum of the
        initial ``W0`` (regenerated from the seed): POET only rotates, so the two should match
        up to the small non-orthogonality of the truncated Cayley-Neumann map. For adamw runs
        the dense weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from poetx.atomic import write_with
from poetx.train.metrics import read_metrics

SPECTRUM_LAYERS = ("self_attn.q_proj", "mlp.down_proj")
_SMOOTH = 0.9


class MissingExtraError(RuntimeError):
    """An optional dependency of a command is not installed; the message names the extra."""


def _use_agg():
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError(
            "poetx plot needs matplotlib, which is not installed: pip install 'poetx[plot]' "
            "(or pip install matplotlib)"
        ) from None

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _label(run_dir: Path) -> str:
    return run_dir.resolve().name


def _smooth(values: list[float], factor: float = _SMOOTH) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = factor * avg + (1 - factor) * v
        out.append(avg / (1 - factor**i))
    return out


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, spectrum: bool = True) -> list[Path]:
    """Write the PNGs for ``run_dirs`` into ``out_dir``; returns the written paths."""
    plt = _use_agg()
    runs = []
    for rd in run_dirs:
        rd = Path(rd)
        if not rd.is_dir():
            raise FileNotFoundError(f"run directory not found: {rd}")
        runs.append((rd, read_metrics(rd)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (rd, records) in enumerate(runs):
        train = [r for r in records if r.get("type") == "train" and r.get("loss") is not None]
        if not train:
            continue
        color = f"C{i % 10}"
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(losses), color=color, label=_label(rd))
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "loss.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (rd, records) in enumerate(runs):
        evals = [r for r in records if r.get("type") == "eval" and r.get("val_ppl") is not None]
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_ppl"] for r in evals], marker="o",
                    color=f"C{i % 10}", label=_label(rd))
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title("Validation perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    written.append(_save(fig, out / "val_ppl.png"))
    plt.close(fig)

    if spectrum:
        for rd, _ in runs:
            path = _plot_spectrum(plt, rd, out / f"spectrum_{_safe_name(rd.resolve().name)}.png")
            if path is not None:
                written.append(path)
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return write_with(path, lambda tmp: fig.savefig(tmp, dpi=110))


def _layer_names(prefixes: list[str]) -> list[str]:
    """A few layers: the first and last decoder block's ``SPECTRUM_LAYERS``."""
    by_index: dict[int, list[str]] = {}
    for name in prefixes:
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m:
            by_index.setdefault(int(m.group(1)), []).append(name)
    if not by_index:
        return sorted(prefixes)[:4]
    chosen = []
    for idx in sorted({min(by_index), max(by_index)}):
        for suffix in SPECTRUM_LAYERS:
            chosen += [n for n in by_index[idx] if n.endswith(suffix)]
    return chosen


def layer_spectra(checkpoint: Path, config) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {"trained": sigma, ["init": sigma]}}`` singular values, descending, float64.

    Only the tensors of the chosen layers are read (``model.safetensors`` or the shards).
    """
    from poetx.layers.poet_linear import POETLinear
    from poetx.train.checkpoint import model_tensor_names, read_model_tensors

    keys = model_tensor_names(checkpoint)
    poet = config.optimizer == "poetx"
    suffix = ".theta_in" if poet else ".weight"
    prefixes = [k[: -len(suffix)] for k in keys if k.endswith(suffix) and "proj" in k]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in _layer_names(prefixes):
        if poet:
            wanted = [k for k in keys if k.startswith(name + ".")]
            tensors = read_model_tensors(checkpoint, wanted)
            state = {k[len(name) + 1:]: v for k, v in tensors.items()}
            w0 = state["w0"]
            out_f, in_f = w0.shape
            dtype = w0.dtype if w0.dtype.is_floating_point and w0.dtype.itemsize > 1 else None
            # Module names inside the run's model match checkpoint key prefixes, so the layer
            # seeds (and thus the initial W0) are those of the run.
            layer = POETLinear(in_f, out_f, bias="bias" in state, config=config.poet,
                               name=name, dtype=dtype or torch.float32)
            init = torch.linalg.svdvals(layer.effective_weight(torch.float64))
            layer.load_state_dict(state, strict=True)
            trained = torch.linalg.svdvals(layer.effective_weight(torch.float64))
            out[name] = {"trained": trained, "init": init}
        else:
            w = read_model_tensors(checkpoint, [name + ".weight"])[name + ".weight"]
            out[name] = {"trained": torch.linalg.svdvals(w.to(torch.float64))}
    return out


def _plot_spectrum(plt, run_dir: Path, path: Path) -> Path | None:
    from poetx.train.checkpoint import latest_checkpoint, read_state
    from poetx.train.config import TrainConfig
    from poetx.train.run_dir import CHECKPOINT_DIR
    from poetx.train.saved_run import find_checkpoint

    if latest_checkpoint(run_dir / CHECKPOINT_DIR) is None:  # no checkpoint yet: curves only
        return None
    ckpt = find_checkpoint(run_dir, action="plot spectra")
    state = read_state(ckpt)
    config = TrainConfig.from_dict(state["config"], source=f"{ckpt}/state.json config")
    spectra = layer_spectra(ckpt, config)
    if not spectra:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, sv) in enumerate(spectra.items()):
        short = name.removeprefix("model.").replace("layers.", "L")
        color = f"C{i % 10}"
        ax.plot(sv["trained"].numpy(), color=color, label=f"{short} (step {state['step']})")
        if "init" in sv:
            ax.plot(sv["init"].numpy(), color=color, linestyle=":", label=f"{short} (init W0)")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_yscale("log")
    kind = "effective weights R W0 P" if config.optimizer == "poetx" else "dense weights"
    ax.set_title(f"{run_dir.resolve().name}: spectra of {kind}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    out = _save(fig, path)
    plt.close(fig)
    return out
