"""MetaOptimize in Lightning, the HF Trainer and timm, with the real packages (pinned in
requirements.txt) and tiny models built from configs (no downloads); and the README's snippets for
them, read from README.md and run as they are."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from common.optimizers import MetaOptimize, MetaOptimize_AdamW_Lion_hg

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet(name: str) -> str:
    """The code block of README.md marked `<!-- snippet: name -->`."""
    found = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert found, f"README.md has no snippet {name!r}"
    return found.group(1)


def run_snippet(name: str, **names) -> dict:
    namespace = {"__name__": f"readme_{name}", **names}
    exec(compile(readme_snippet(name), f"README.md:{name}", "exec"), namespace)
    return namespace


def blocks_by_name(optimizer, model) -> dict[str, int]:
    names = {id(p): n for n, p in model.named_parameters()}
    if isinstance(optimizer, MetaOptimize_AdamW_Lion_hg):
        return {names[id(p)]: b for b, block in enumerate(optimizer._blocks) for p in block}
    return {names[id(p)]: optimizer._layout.starts[i] for i, p in enumerate(optimizer._params)}


def log_alpha(optimizer):
    if isinstance(optimizer, MetaOptimize_AdamW_Lion_hg):
        return torch.stack([m["beta"] for m in optimizer.meta_state])
    return optimizer._beta


def classification_data(n=128, batch_size=4, features=8, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = (x[:, :classes] + 0.3 * torch.randn(n, classes, generator=gen)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def logged_rows(logger) -> list[dict]:
    """The rows a CSVLogger wrote."""
    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---- Lightning ----------------------------------------------------------------------------------


def lit_module(net, make_optimizer, scheduler=None, backbone=None):
    import lightning.pytorch as L

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net
            if backbone is not None:
                self.backbone = backbone

        def forward(self, x):
            return self.net(self.backbone(x) if backbone is not None else x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            optimizer = make_optimizer(self)
            if scheduler is None:
                return optimizer
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler(optimizer), "interval": "step"}}

    return Lit()


def lit_trainer(tmp_path, name, **kwargs):
    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger

    kwargs.setdefault("logger", CSVLogger(tmp_path, name=name))
    return L.Trainer(default_root_dir=tmp_path / name, enable_progress_bar=False, enable_model_summary=False,
                     **kwargs)


def test_readme_lightning_snippet_logs_step_sizes_and_the_lr_multiplier(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = mlp()
    ns = run_snippet("lightning", net=net, train_loader=classification_data())
    trainer = ns["trainer"]
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, MetaOptimize) and trainer.global_step == 64
    rows = logged_rows(trainer.logger) if hasattr(trainer.logger, "log_dir") else []
    logged = [r for r in rows if r.get("step_size/block_0")]
    assert [int(r["step"]) for r in logged] == [50]  # log_every_n_steps=50, after the step
    sizes = [float(logged[0][f"step_size/block_{i}"]) for i in range(4)]  # layerwise: a block per tensor
    assert all(math.isfinite(s) and s > 0 for s in sizes) and "step_size/block_4" not in logged[0]
    lrs = [float(r["lr-MetaOptimize"]) for r in rows if r.get("lr-MetaOptimize")]
    assert lrs == [pytest.approx(0.1 + 0.9 * 49 / 100)]  # the warm-up of the multiplier, logged before step 50
    assert set(trainer.callback_metrics) >= {f"step_size/block_{i}" for i in range(4)}


def test_lightning_bf16_mixed_gradient_accumulation_and_many_blocks(tmp_path):
    """bf16 autocast with accumulation: the monitor logs once per optimizer step it is due (not per
    batch), and beyond 64 blocks it logs min, median and max."""
    from common.integrations import StepSizeMonitor

    net = mlp()
    module = lit_module(net, lambda m: MetaOptimize(m, alpha0=1e-3, meta_stepsize=1e-2, stepsize_groups="weightwise"))
    trainer = lit_trainer(tmp_path, "bf16", max_epochs=1, precision="bf16-mixed", accumulate_grad_batches=4,
                          callbacks=[StepSizeMonitor(log_every_n_steps=2)])
    trainer.fit(module, classification_data())
    assert trainer.global_step == 8  # 32 batches, a step every 4
    rows = [r for r in logged_rows(trainer.logger) if r.get("step_size/median")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    for r in rows:
        assert float(r["step_size/min"]) <= float(r["step_size/median"]) <= float(r["step_size/max"])
    assert "step_size/block_0" not in rows[0]
    optimizer = trainer.optimizers[0]
    assert optimizer.num_blocks == sum(p.numel() for p in net.parameters()) > 64
    assert not torch.all(optimizer.step_sizes() == optimizer.step_sizes()[0])  # the blocks moved apart


def _resume_setup(tmp_path, name, max_epochs, ckpt_path=None, callbacks=(), scheduler=True):
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    net = mlp()

    def make_optimizer(m):
        return MetaOptimize(m, alpha0=1e-3, meta_stepsize=1e-2, stepsize_groups="layerwise", alg_meta="Adam",
                            normalizer_param_meta=0.999)

    module = lit_module(net, make_optimizer, scheduler=(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(
        o, T_max=200)) if scheduler else None)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1, every_n_epochs=1)
    trainer = lit_trainer(tmp_path, name, max_epochs=max_epochs, callbacks=[checkpoints, *callbacks])
    trainer.fit(module, classification_data(n=64), ckpt_path=ckpt_path)
    return module, trainer


def test_lightning_checkpoint_and_ckpt_path_resume_bit_exact(tmp_path):
    whole, whole_trainer = _resume_setup(tmp_path, "whole", max_epochs=2)
    _, first = _resume_setup(tmp_path, "first", max_epochs=1)
    (ckpt,) = (tmp_path / "first").glob("*.ckpt")
    resumed, resumed_trainer = _resume_setup(tmp_path, "resumed", max_epochs=2, ckpt_path=ckpt)
    assert resumed_trainer.global_step == whole_trainer.global_step == 32
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    o1, o2 = whole_trainer.optimizers[0], resumed_trainer.optimizers[0]
    assert torch.equal(o1.step_sizes(), o2.step_sizes()) and o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"] < 1


def test_lightning_stochastic_weight_averaging(tmp_path):
    """SWA's SWALR sets the lr multiplier to swa_lrs; the averaged weights end in the module."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    swa = StochasticWeightAveraging(swa_lrs=0.5, swa_epoch_start=1, annealing_epochs=1)
    module = lit_module(mlp(), lambda m: MetaOptimize(m, alpha0=1e-3, meta_stepsize=1e-2))
    trainer = lit_trainer(tmp_path, "swa", max_epochs=3, callbacks=[swa])
    trainer.fit(module, classification_data())
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    torch.testing.assert_close(optimizer.effective_step_sizes(), torch.exp(optimizer._beta) * 0.5)
    assert swa.n_averaged.item() >= 2  # in epochs 1 and 2
    for p, q in zip(module.parameters(), swa._average_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [MetaOptimize, MetaOptimize_AdamW_Lion_hg], ids=lambda c: c.__name__)
def test_lightning_backbone_finetuning_adds_a_block_and_resumes(tmp_path, cls):
    """The backbone joins as a new block at alpha0 (its lr a tenth of the head's) at the unfreeze
    epoch; a checkpoint after it loads: Lightning puts the groups back into param_groups directly,
    and the optimizer gives the backbone its block again, with its saved step size. (Lightning
    2.6 leaves the backbone frozen after such a resume, with any optimizer: not checked here.)"""
    from lightning.pytorch.callbacks import BackboneFinetuning, ModelCheckpoint

    def run(name, max_epochs, ckpt_path=None):
        torch.manual_seed(0)
        backbone, head = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 3)
        module = lit_module(head, lambda m: cls(filter(lambda p: p.requires_grad, m.parameters()), alpha0=1e-3,
                                                meta_stepsize=1e-2), backbone=backbone)
        finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1, every_n_epochs=1)
        trainer = lit_trainer(tmp_path, name, max_epochs=max_epochs, callbacks=[finetuning, checkpoints])
        trainer.fit(module, classification_data(n=32), ckpt_path=ckpt_path)
        return module, trainer.optimizers[0]

    module, optimizer = run("whole", max_epochs=3)
    assert optimizer.step_sizes().numel() == 2 and len(optimizer.param_groups) == 2
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.1)
    expected = {"net.weight": 0, "net.bias": 0, "backbone.0.weight": 1, "backbone.0.bias": 1}
    assert blocks_by_name(optimizer, module) == expected
    ckpt = tmp_path / "whole" / "epoch=1-step=16.ckpt"
    state = torch.load(ckpt, weights_only=True)["optimizer_states"][0]
    saved = state["meta"]["beta"] if cls is MetaOptimize else torch.stack([m["beta"] for m in state["meta_state"]])
    resumed_module, resumed = run("resumed", max_epochs=2, ckpt_path=ckpt)  # load, no more epochs
    assert resumed.step_sizes().numel() == 2 and len(resumed.param_groups) == 2
    assert blocks_by_name(resumed, resumed_module) == expected
    assert torch.equal(log_alpha(resumed), saved) and saved[1] != math.log(1e-3)


# ---- HF Trainer -----------------------------------------------------------------------------------


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=16, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def token_dataset(n=64, length=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (n, length), generator=gen)]


def hf_args(out, **kwargs):
    from transformers import TrainingArguments

    defaults = dict(max_steps=8, per_device_train_batch_size=8, logging_steps=2, report_to="none", use_cpu=True,
                    disable_tqdm=True, save_strategy="no", seed=0, data_seed=0)
    return TrainingArguments(str(out), **{**defaults, **kwargs})


def test_readme_hf_snippet_logs_step_sizes_beside_the_lr_multiplier(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_gpt2()
    ns = run_snippet("hf", model=model, train_dataset=token_dataset())
    trainer = ns["trainer"]
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == [10, 20, 30, 40]
    tensors = len([p for p in model.parameters() if p.requires_grad])
    # the Trainer logs the lr the step used (warm-up, then the cosine); the step sizes are lr alpha
    # as the step left them (as the experiments log them): at the end the schedule's lr is 0
    cosine = [0.5 * (1 + math.cos(math.pi * (s - 1 - 10) / 30)) for s in (20, 30, 40)]
    assert [e["learning_rate"] for e in logs] == pytest.approx([0.9, *cosine])
    sizes = [[e[f"step_size/block_{i}"] for i in range(tensors)] for e in logs]
    assert all(s == pytest.approx(1e-4, rel=0.01) for s in sizes[0])  # lr 1 after the warm-up
    assert all(0 < s < 1e-4 for row in sizes[1:3] for s in row) and sizes[3] == [0.0] * tensors
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around it
    decay = {g["weight_decay"] for g in optimizer.param_groups}
    assert decay == {0.1, 0.0}  # the Trainer's decay and no-decay groups


def test_hf_step_size_callback_comes_before_the_loggers(tmp_path):
    """attach() puts it before the callbacks the Trainer was built with (where report_to's loggers
    are): a callback standing in for one sees the step sizes. In callbacks= it still fills the log
    history."""
    from transformers import Trainer, TrainerCallback

    from common.integrations import StepSizeCallback

    class Logger(TrainerCallback):
        seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    for attach in (True, False):
        Logger.seen = []
        trainer = Trainer(model=tiny_gpt2(), args=hf_args(tmp_path / f"cb{attach}", max_steps=4),
                          train_dataset=token_dataset(),
                          optimizer_cls_and_kwargs=(MetaOptimize, dict(alpha0=1e-3)),
                          callbacks=[Logger] if attach else [Logger, StepSizeCallback()])
        if attach:
            StepSizeCallback.attach(trainer)
        trainer.train()
        train_logs = [e for e in Logger.seen if "learning_rate" in e]
        assert len(train_logs) == 2 and all(("step_size/block_0" in e) == attach for e in train_logs)
        assert all("step_size/block_0" in e for e in trainer.state.log_history if "learning_rate" in e)


def test_hf_optimizers_tuple_with_model_blocks_and_the_default_scheduler(tmp_path):
    """An optimizer built by hand (block lists by count need model=) with the Trainer's own linear
    schedule: the blocks follow the model, the multiplier decays to 0."""
    from timm.optim import param_groups_weight_decay
    from transformers import Trainer

    model = tiny_gpt2()
    groups = param_groups_weight_decay(model, weight_decay=0.1)  # norms and biases first
    count = len(list(model.parameters()))
    optimizer = MetaOptimize(groups, model=model, stepsize_groups=[2, count - 3, 1], alpha0=1e-3)
    trainer = Trainer(model=model, args=hf_args(tmp_path / "tuple"), train_dataset=token_dataset(),
                      optimizers=(optimizer, None))
    trainer.train()
    blocks = blocks_by_name(optimizer, model)
    assert blocks["transformer.wte.weight"] == blocks["transformer.wpe.weight"] == 0
    assert blocks["transformer.ln_f.weight"] == 1 and blocks["transformer.ln_f.bias"] == 2
    assert optimizer.param_groups[0]["lr"] == 0.0  # linear decay of the multiplier, to 0 at max_steps
    assert not torch.equal(optimizer._beta, torch.full_like(optimizer._beta, math.log(1e-3)))


def test_hf_save_and_resume_bit_exact(tmp_path):
    from transformers import Trainer

    def trainer_for(out, model):
        return Trainer(model=model, args=hf_args(out, save_strategy="steps", save_steps=4, lr_scheduler_type="cosine",
                                                 warmup_steps=2, weight_decay=0.05),
                       train_dataset=token_dataset(),
                       optimizer_cls_and_kwargs=(MetaOptimize, dict(alpha0=1e-3, meta_stepsize=1e-2,
                                                                    stepsize_groups="layerwise")))

    whole_model, resumed_model = tiny_gpt2(), tiny_gpt2()
    whole = trainer_for(tmp_path / "whole", whole_model)
    whole.train()
    resumed = trainer_for(tmp_path / "resumed", resumed_model)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"))
    for a, b in zip(whole_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(whole.optimizer.optimizer.step_sizes(), resumed.optimizer.optimizer.step_sizes())


# ---- timm -----------------------------------------------------------------------------------------


def test_readme_timm_snippet_blocks_follow_the_model_under_timm_groups_and_scheduler():
    from timm.scheduler import CosineLRScheduler

    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,), generator=gen))
              for _ in range(2)]
    ns = run_snippet("timm", train_loader=loader)
    model, optimizer = ns["model"], ns["optimizer"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.05]
    blocks = blocks_by_name(optimizer, model)
    assert blocks["conv1.weight"] == blocks["bn1.bias"] == 0
    assert blocks["layer1.0.conv1.weight"] == blocks["layer1.1.bn2.bias"] == 1
    assert blocks["layer4.1.bn2.bias"] == 4 and blocks["fc.weight"] == blocks["fc.bias"] == 5
    assert optimizer.step_sizes().numel() == 6
    scheduler = CosineLRScheduler(optimizer, t_initial=4, warmup_t=1, warmup_lr_init=0.1, t_in_epochs=False)
    x, y = loader[0]
    for step in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step_update(step + 1)
    lr = optimizer.param_groups[0]["lr"]
    assert 0 < lr < 1
    torch.testing.assert_close(optimizer.effective_step_sizes(), torch.exp(optimizer._beta) * lr)
