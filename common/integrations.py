"""Step sizes in the tools people train with: a Lightning callback and an HF Trainer callback that
log an optimizer's step size per block under the experiments' keys (`step_size/block_i`, or
`step_size/min`, `/median`, `/max` beyond 64 blocks: `common.step_metrics.step_size_metrics`).

    from common.integrations import StepSizeMonitor      # Lightning
    trainer = L.Trainer(callbacks=[StepSizeMonitor()])

    from common.integrations import StepSizeCallback     # HF Trainer
    trainer = Trainer(model, args, ...)
    StepSizeCallback.attach(trainer)

The step sizes are those of `common.step_metrics.effective_step_sizes`: lr alpha per block for
MetaOptimize (through the wrappers the frameworks put around it), each group's lr for others.
They are read (one host sync) only on the steps that log. Lightning and transformers are imported
when a class is first asked for, so `common` needs neither.
"""

from __future__ import annotations

import functools

import torch

from common.step_metrics import effective_step_sizes, step_size_metrics

__all__ = []  # imported by name (they import their framework): StepSizeMonitor, StepSizeCallback


def __getattr__(name):
    if name == "StepSizeMonitor":
        return _lightning_monitor()
    if name == "StepSizeCallback":
        return _hf_callback()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _lightning_monitor():
    import lightning.pytorch as L  # noqa: N812 (Lightning's own spelling)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    class StepSizeMonitor(L.Callback):
        """Logs the step size per block of the trainer's optimizers to every logger, every
        `log_every_n_steps` optimizer steps (the Trainer's `log_every_n_steps` by default), after
        the step; as LearningRateMonitor does for the lr. Several optimizers (manual optimization):
        `step_size/optimizer_j/block_i`. The values also go into `trainer.callback_metrics`, so
        ModelCheckpoint and EarlyStopping can watch them."""

        def __init__(self, log_every_n_steps: int | None = None):
            if log_every_n_steps is not None and log_every_n_steps < 1:
                raise MisconfigurationException(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
            self.log_every_n_steps = log_every_n_steps
            self._logged_step = None

        def on_train_start(self, trainer, pl_module):
            if not trainer.loggers:
                raise MisconfigurationException("Cannot use StepSizeMonitor with a Trainer that has no logger.")
            self._logged_step = trainer.global_step  # nothing to log before the first step (of this fit)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            every = self.log_every_n_steps or trainer.log_every_n_steps
            if step == self._logged_step or step % every:  # no step this batch (accumulating), or not due
                return
            self._logged_step = step
            optimizers = trainer.optimizers
            metrics = {}
            for j, optimizer in enumerate(optimizers):
                keys, sizes = step_size_metrics(effective_step_sizes(optimizer).float(),
                                                f"optimizer_{j}/" if len(optimizers) > 1 else "")
                metrics.update(zip(keys, sizes.tolist()))  # one host sync per optimizer
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    StepSizeMonitor.__module__, StepSizeMonitor.__qualname__ = __name__, "StepSizeMonitor"
    return StepSizeMonitor


@functools.cache
def _hf_callback():
    from transformers import DefaultFlowCallback, TrainerCallback

    class StepSizeCallback(TrainerCallback):
        """Adds the optimizer's step size per block to the Trainer's training logs (every
        `logging_steps`): the console, `trainer.state.log_history` and the `report_to` integrations
        (wandb, TensorBoard, ...) show them beside loss and learning_rate. They are the step sizes
        as the step left them (lr alpha for the next step, as the experiments log them), while the
        Trainer's learning_rate is the lr the step used.

        The Trainer calls its callbacks in order and puts those given in `callbacks=` after its
        `report_to` integrations, which would then log before the step sizes are added: add it
        with `StepSizeCallback.attach(trainer)`, which puts it before them."""

        def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
            if logs is None or optimizer is None or "learning_rate" not in logs:  # training logs only
                return
            keys, sizes = step_size_metrics(effective_step_sizes(optimizer).float())
            metrics = dict(zip(keys, sizes.tolist()))  # one host sync
            logs.update(metrics)
            last = state.log_history[-1] if state.log_history else {}
            if last.get("step") == state.global_step and "learning_rate" in last:
                last.update(metrics)

        @classmethod
        def attach(cls, trainer, *args, **kwargs):
            """Add a StepSizeCallback(*args, **kwargs) to `trainer` right after its flow callback,
            before the report_to integrations; returns it."""
            callback = cls(*args, **kwargs)
            callbacks = trainer.callback_handler.callbacks
            flow = next((i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)), -1)
            callbacks.insert(flow + 1, callback)
            return callback

    StepSizeCallback.__module__, StepSizeCallback.__qualname__ = __name__, "StepSizeCallback"
    return StepSizeCallback
