"""Hugging Face Trainer, accelerate, other model families, and the README examples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import poetx
from poetx import POETAdamW, POETConfig
from poetx.integrations.transformers import merged_state_dict, save_pretrained_merged
from tests.isolation import assert_loads_without_poetx

REPO = Path(__file__).resolve().parent.parent
VOCAB = 96
SEQ = 12


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model, out: Path, steps: int, **optimizer_kwargs):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
        learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=0.0,
        save_steps=10, save_strategy="steps", logging_steps=5, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=TokenDataset(2 * steps),
                   optimizer_cls_and_kwargs=(POETAdamW, {"model": model, **optimizer_kwargs}))


def test_trainer_merges_resumes_exactly_and_saves_dense(tmp_path):
    steps, config = 24, POETConfig(block_size=16, merge_every=8)
    opt = {"lr": 5e-3, "poet_lr": 2e-3, "max_grad_norm": 1.0, "clip_warmup_steps": 2}
    model = poetx.wrap(tiny_llama(), config)
    trainer = _trainer(model, tmp_path / "a", steps, **opt)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                      else trainer.optimizer, POETAdamW)
    assert int(model.model.layers[0].mlp.up_proj.merge_count) == steps // 8
    ckpt = tmp_path / "a" / "checkpoint-10"  # between the first and the second merge
    assert (ckpt / "model.safetensors").is_file()

    # Another init, and the permutations of merge 0 while the checkpoint holds those of merge 1:
    # all must come back from the checkpoint (the POETConfig is the run's, as the model code).
    fresh = poetx.wrap(tiny_llama(seed=7), config)
    resumed = _trainer(fresh, tmp_path / "b", steps, **opt)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert int(fresh.model.layers[0].mlp.up_proj.merge_count) == steps // 8
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    dest = tmp_path / "dense"
    save_pretrained_merged(model, dest)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert_loads_without_poetx(dest, ids, logits, tmp_path)


def _causal_lm(family: str):
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    configs = {"qwen2": Qwen2Config, "mistral": MistralConfig}
    config = configs[family](vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_train_merge_and_export(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = poetx.wrap(_causal_lm(family), POETConfig(block_size=16, merge_every=3))
    if family == "qwen2":  # q/k/v carry a bias
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    optimizer = POETAdamW(model, lr=1e-2, poet_lr=5e-3)
    data = TokenDataset(12)
    losses = []
    for i in range(6):
        batch = data.ids[2 * i: 2 * i + 2]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert optimizer.merges == 2 and all(torch.isfinite(torch.tensor(losses)))
    save_pretrained_merged(model, tmp_path / family)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
    assert not any(isinstance(m, poetx.POETLinear) for m in dense.modules())
    model.eval()
    ids = data.ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    # The dense checkpoint has exactly the keys of an unwrapped model of the family.
    assert set(merged_state_dict(model)) == set(_causal_lm(family).state_dict())


def test_gpt2_conv1d_projections_wrap_train_and_export_as_conv1d(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                       n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0)).double()
    ids = TokenDataset(8).ids
    with torch.no_grad():
        before = model(input_ids=ids[:2]).logits
    poetx.wrap(model, POETConfig(block_size=16, merge_every=2, init="keep"))
    names = ("c_attn", "c_proj", "c_fc")
    assert all(isinstance(m, poetx.POETLinear) for n, m in model.named_modules()
               if n.endswith(names))
    with torch.no_grad():  # "keep": the same function before any step
        torch.testing.assert_close(model(input_ids=ids[:2]).logits, before)
    optimizer = POETAdamW(model, lr=1e-2)
    for i in range(4):
        batch = ids[2 * i: 2 * i + 2]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.merges == 2
    with torch.no_grad():
        trained = model(input_ids=ids[:2]).logits
    save_pretrained_merged(model, tmp_path / "gpt2")
    dense = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2", dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids[:2]).logits, trained)
    poetx.unwrap(model)
    assert all(type(m) is Conv1D for n, m in model.named_modules() if n.endswith(names))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids[:2]).logits, trained)


def _accelerate_run(seed: int, state_dir: Path, save_at: int | None = None,
                    resume: bool = False):
    """10 steps of an ``accelerate`` loop (merges every 3); optionally save or resume at 4."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import get_cosine_schedule_with_warmup

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    model = poetx.wrap(tiny_llama(seed), POETConfig(block_size=16, merge_every=3))
    optimizer = POETAdamW(model, lr=5e-3, poet_lr=2e-3, max_grad_norm=1.0, clip_warmup_steps=2)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 2, 10)
    loader = torch.utils.data.DataLoader(TokenDataset(20), batch_size=2)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    start = 0
    if resume:
        accelerator.load_state(str(state_dir))
        start = 4
        loader = accelerator.skip_first_batches(loader, start)
    for step, batch in enumerate(loader, start=start + 1):
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step == save_at:
            accelerator.save_state(str(state_dir))
    return accelerator.unwrap_model(model), optimizer.optimizer


def test_accelerate_loop_merges_and_resumes_exactly_from_save_state(tmp_path):
    model, optimizer = _accelerate_run(0, tmp_path / "state", save_at=4)
    assert isinstance(optimizer, POETAdamW) and optimizer.merges == 3
    resumed, again = _accelerate_run(9, tmp_path / "state", resume=True)
    assert again.merge_schedule.state_dict() == optimizer.merge_schedule.state_dict()
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_trainer_with_an_optimizer_instance_schedules_both_groups(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = poetx.wrap(tiny_llama(), POETConfig(block_size=16, merge_every=3))
    optimizer = POETAdamW(model, lr=4e-3, poet_lr=1e-3)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2,
                             lr_scheduler_type="constant_with_warmup", warmup_steps=10,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(12),
                      optimizers=(optimizer, None))
    trainer.train()
    assert optimizer.merges == 2
    # Trainer's scheduler scaled every group by the same factor: poet_lr / lr is kept.
    lrs = {g["name"]: (g["lr"], g["initial_lr"]) for g in optimizer.param_groups}
    assert lrs["poet"][1] == 1e-3 and lrs["decay"][1] == 4e-3
    assert lrs["poet"][0] == pytest.approx(0.6e-3) and lrs["decay"][0] == pytest.approx(2.4e-3)


@pytest.mark.parametrize("mode", ["fast", "mem"])
def test_poet_layer_under_autocast_computes_in_the_autocast_dtype(mode):
    """Mixed precision (``Trainer(bf16=True)``): the layer runs as it does on bf16 inputs."""
    layer = poetx.POETLinear(40, 24, config=POETConfig(block_size=16, mode=mode))
    with torch.no_grad():
        layer.theta_in.normal_(0, 0.05)
        layer.theta_out.normal_(0, 0.05)
    x = torch.randn(6, 40)
    x_auto, x_ref = x.clone().requires_grad_(), x.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x_auto)
    y.float().square().sum().backward()
    grads = (x_auto.grad, layer.theta_in.grad.clone(), layer.theta_out.grad.clone())
    layer.zero_grad()
    y_ref = layer(x_ref)
    y_ref.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for got, want in zip(grads, (x_ref.grad, layer.theta_in.grad, layer.theta_out.grad),
                         strict=True):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=0)


def test_trainer_bf16_mixed_precision_trains(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = poetx.wrap(tiny_llama(), POETConfig(block_size=16, merge_every=3))
    optimizer = POETAdamW(model, lr=5e-3)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2,
                             bf16=True, report_to=[], use_cpu=True, disable_tqdm=True,
                             save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(12),
                      optimizers=(optimizer, None))
    result = trainer.train()
    assert optimizer.merges == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert model.model.layers[0].mlp.up_proj.theta_in.dtype == torch.float32
