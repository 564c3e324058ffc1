"""Training a POET-X model with Hugging Face ``Trainer``, and saving it as a plain HF model.

Nothing here subclasses ``Trainer``: a wrapped model is an ordinary ``PreTrainedModel`` and
``poetx.POETAdamW`` is an ordinary ``torch.optim.AdamW`` that merges inside ``step()``::

    model = poetx.wrap(AutoModelForCausalLM.from_config(config), poetx.POETConfig(...))
    optimizer = poetx.POETAdamW(model, lr=1e-3, poet_lr=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None))
    # or: Trainer(..., optimizer_cls_and_kwargs=(poetx.POETAdamW, {"model": model, "lr": 1e-3}))
    trainer.train()                              # merges every merge_every optimizer steps
    trainer.train(resume_from_checkpoint=True)   # exact continuation
    save_pretrained_merged(model, "dense/")      # loads with transformers alone

What a ``Trainer`` checkpoint holds and why resuming is exact: ``model.safetensors`` is the
wrapped model's ``state_dict``: ``W0`` (a frozen parameter), the skew parameters, and the
persistent buffers ``perm_in`` / ``perm_out`` / ``merge_count`` of every ``POETLinear``;
``optimizer.pt`` is ``POETAdamW.state_dict()``, which carries the merge schedule's step
counter; the lr scheduler and RNG states are ``Trainer``'s own. ``Trainer`` builds its lr
scheduler over the optimizer's groups, so the rotation group keeps its ratio ``poet_lr / lr``
along the schedule. Clipping: ``TrainingArguments.max_grad_norm`` clips as usual; for the clip
warm-up after merges give ``POETAdamW(max_grad_norm=..., clip_warmup_steps=...)`` and set
``TrainingArguments(max_grad_norm=0)``. ``TrainingArguments(bf16=True)`` (autocast) runs the
POET layers in bf16 with float32 skew parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from poetx.model.wrap import FROM_CONV1D, poet_layers


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every ``POETLinear`` replaced by the dense ``nn.Linear``
    entries it stands for (``<name>.weight`` ``(out, in)`` = ``R W0 P`` in the layer's dtype,
    transposed for a layer wrapped from a GPT-2 ``Conv1D``; ``<name>.bias``); the model is not
    modified."""
    layers = dict(poet_layers(model))
    state = {}
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] not in layers:  # a POETLinear has no submodules
            state[key] = value
    for name, layer in layers.items():
        weight = layer.effective_weight(torch.float32).to(layer.compute_dtype)
        # A GPT-2 Conv1D stores its weight (in, out).
        state[f"{name}.weight"] = weight.t().contiguous() if getattr(layer, FROM_CONV1D,
                                                                      False) else weight
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.detach()
    return state


def save_pretrained_merged(model: nn.Module, save_directory: str | Path, **kwargs: Any) -> None:
    """``model.save_pretrained`` of the dense model ``R W0 P`` (rotations merged), so that
    ``AutoModelForCausalLM.from_pretrained(save_directory)`` loads it without poetx.

    ``model`` is a wrapped Hugging Face ``PreTrainedModel`` and is left as it is (training can
    go on); ``kwargs`` go to ``save_pretrained``.
    """
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        raise TypeError(f"save_pretrained_merged: {type(model).__name__} is not a Hugging Face "
                        "PreTrainedModel (no save_pretrained); use poetx.unwrap and save it")
    save(str(save_directory), state_dict=merged_state_dict(model), **kwargs)
