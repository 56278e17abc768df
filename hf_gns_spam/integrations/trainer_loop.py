"""Every place where hf_gns_spam reaches into ``transformers.Trainer`` beyond the public callback events.

Written for :data:`~hf_gns_spam.errors.TRANSFORMERS_REQUIREMENT` (``trainer.py``). A :class:`TrainerLoopObserver`
(``GNSCallback``) gets these hooks; each says why no public event suffices, and each checks that what it wraps is
what it expects, raising :class:`~hf_gns_spam.errors.TrainerIntegrationError` otherwise.

Installed on the ``Trainer`` class once (:func:`install_trainer_hooks`, called when the first observer is created),
a pass-through for Trainers that have no observer among their callbacks:

* ``train(resume_from_checkpoint, ...)``: ``Trainer.train`` reads the checkpoint's ``trainer_state.json`` (where the
  observers' saved state lives) before any other hook or event, and a truncated or otherwise unreadable file fails
  there with json's own error, which names no file; the wrapper reads it first and raises
  :class:`~hf_gns_spam.errors.CheckpointError` naming the file and the earlier checkpoints beside it.
* ``set_initial_training_values(args, dataloader)``: the Trainer sizes its epoch loop from
  ``args.gradient_accumulation_steps`` here, before any callback event of ``train()``; an observer must set the
  accumulation it starts with before that, and needs the loop bounds computed here (``steps_in_epoch``,
  ``num_update_steps_per_epoch``, ``max_steps``), which no event passes. This is also where an observer is attached
  to the Trainer, whichever way it was added (``callbacks=[...]``, ``add_callback``).
* ``_init_training_state(...)``: on resume the Trainer computes where to restart assuming a constant accumulation,
  and with ``restore_callback_states_from_checkpoint`` it replaces each callback by a new instance made from the
  saved options; the wrapper puts the user's observer back (it restores its own state and checks the user's
  options against the saved ones), names the checkpoint's ``trainer_state.json`` when the saved options do not
  make a callback, and lets the observers give the exact (epoch, micro-batch) to restart from.

Installed on the Trainer instance being trained (:func:`_attach`):

* ``trainer.compute_loss``: the loss of each micro-batch, the outputs and labels it was computed on, and
  ``num_items_in_batch``, are seen nowhere else (the labels are popped before the forward for label smoothing and
  ``compute_loss_func``; subclasses such as TRL's ``SFTTrainer`` compute the loss themselves). The outputs are asked
  for (``return_outputs=True``) only on the micro-batches where an observer wants them: TRL's ``SFTTrainer`` (1.16)
  computes its loss through a fused LM head without logits and runs a second forward pass to return them.
* ``trainer.accelerator.backward``: the loss actually back-propagated (after the Trainer's division by the
  accumulation for losses not normalised by ``num_items_in_batch``) and the fp16 loss scale.
* ``trainer.accelerator.clip_grad_norm_``: the accumulated gradient after the all-reduce and before clipping, and
  the norm of the whole gradient it returns (which the Trainer logs only at logging steps);
  ``on_pre_optimizer_step`` comes after clipping.
* ``trainer.log``: extra metrics merged into the Trainer's own log record (reporting integrations run before user
  callbacks, so ``on_log`` is too late for them).

Wrapped on the ``Trainer`` class only while ``hf-gns-spam launch`` runs a script (:func:`trainer_construction_hooks`):

* ``Trainer.__init__``, ``Trainer.call_model_init`` and ``Trainer.add_callback``: an unmodified script builds its
  Trainer (TRL's trainers load the model inside it); the launcher must patch the model before the Trainer builds
  anything from it (optimizer groups, peft, FSDP wrapping), then add its callback, and give way to a GNSCallback
  the script adds itself. No event runs before ``__init__`` ends.

Read or set from a callback event:

* ``ProgressCallback.training_bar.total`` (:func:`show_total_steps`): the progress bar takes its total from
  ``state.max_steps`` once, at ``on_train_begin``, and no event tells it that the number of optimizer steps changed
  (a growing batch).
* ``LambdaLR.last_epoch`` and ``_last_lr`` (:func:`set_schedule_position`): the Trainer's learning-rate schedules
  count optimizer steps; a growing batch needs the schedule at the data consumed instead, and the Trainer logs
  ``get_last_lr()``, which reads ``_last_lr``.
* ``trainer.current_gradient_accumulation_steps`` (:func:`fetched_accumulation`): the micro-batches the Trainer
  fetched for the step that just ended (its last group of an epoch may be shorter), which no event passes.
* ``state.stateful_callbacks`` (:func:`saved_callback_state`): a callback's saved state in the checkpoint being
  resumed, which ``restore_callback_states_from_checkpoint=False`` (the default) leaves unread.
* ``trainer.label_smoother`` (:func:`label_smoothing`): the ε the Trainer's loss smooths labels with.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, has_length

from hf_gns_spam.errors import TRANSFORMERS_CHECKED, TRANSFORMERS_REQUIREMENT, CheckpointError, TrainerIntegrationError

# the start of the FutureWarning TRL's SFTTrainer (1.16) gives for compute_loss(return_outputs=True)
TRL_RETURN_OUTPUTS_NOTICE = r"`return_outputs=True`, and the logits it passes to `compute_metrics`"

__all__ = ["TrainerLoopObserver", "install_trainer_hooks", "observers_of", "show_total_steps", "wrap_trainer_class"]

# name -> the parameters (after self) the wrapper passes on; checked when the hooks are installed
_CLASS_METHODS = {
    "train": ("resume_from_checkpoint", "trial", "ignore_keys_for_eval"),
    "set_initial_training_values": ("args", "dataloader"),
    "_init_training_state": (
        "max_steps",
        "num_update_steps_per_epoch",
        "num_train_epochs",
        "resume_from_checkpoint",
        "trial",
    ),
}
_INSTANCE_ATTRIBUTES = ("compute_loss", "accelerator", "log", "callback_handler", "args", "state")
_ATTACHED = "_gns_attached_hooks"


class TrainerLoopObserver:
    """What the Trainer hooks call. Every method has a no-op default."""

    def attach(self, trainer: Trainer) -> None:
        """The observer is about to train with ``trainer`` (called at the start of every ``train()``)."""

    def before_loop_bounds(self, trainer: Trainer) -> None:
        """Before the Trainer sizes its loop from ``args.gradient_accumulation_steps``."""

    def loop_bounds(
        self, trainer: Trainer, steps_in_epoch: int, fetches_per_epoch: int, max_steps: int, has_length: bool
    ) -> None:
        """The loop bounds the Trainer computed for this ``train()``; ``has_length``: the data ends with each epoch
        (map-style), rather than going on (an iterable dataset, whose "epoch" the Trainer sizes from max_steps)."""

    def resume_position(
        self, trainer: Trainer, epochs_trained: int, skip: int, checkpoint: str | None
    ) -> tuple[int, int]:
        """(epoch, micro-batches to skip in it) to restart from the checkpoint directory ``checkpoint`` (None: a fresh
        run); the Trainer's own values come in."""
        return epochs_trained, skip

    def wants_outputs(self, trainer: Trainer) -> bool:
        """Whether ``observe_loss`` needs the model's outputs for the next training micro-batch. Asking costs an
        extra forward pass in Trainers whose loss does not come from the logits (TRL's fused LM head)."""
        return False

    def observe_loss(
        self, trainer: Trainer, inputs: dict, num_items_in_batch: Any, loss: torch.Tensor, outputs: Any
    ) -> None:
        """One training micro-batch's loss, as ``compute_loss`` returned it, with what it was computed on; the
        outputs are None unless an observer wanted them (``wants_outputs``) or the Trainer asked for them."""

    def observe_backward(self, trainer: Trainer, loss: torch.Tensor, loss_scale: float) -> None:
        """The loss handed to the backward, and the fp16 loss scale applied to it (1 without)."""

    def before_clipping(self, trainer: Trainer) -> None:
        """The step's gradient is accumulated and all-reduced; clipping comes next."""

    def after_clipping(self, trainer: Trainer, gradient_norm: Any) -> None:
        """The norm of the step's whole gradient before clipping, as ``clip_grad_norm_`` returned it (a tensor)."""

    def log_metrics(self) -> dict[str, float]:
        """Metrics to merge into a Trainer log record that has ``loss``."""
        return {}


def observers_of(trainer: Trainer) -> list[TrainerLoopObserver]:
    return [c for c in trainer.callback_handler.callbacks if isinstance(c, TrainerLoopObserver)]


def show_total_steps(trainer: Trainer, total: int) -> None:
    """Show ``total`` optimizer steps on the progress bar of ``trainer``'s ``ProgressCallback`` (tqdm, whose
    ``total`` can change while it runs); nothing while it has none (before ``on_train_begin``, other processes,
    ``disable_tqdm``)."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
        if bar is None:
            continue
        if not (hasattr(bar, "total") and callable(getattr(bar, "refresh", None))):
            raise _unsupported(f"ProgressCallback.training_bar is a {type(bar).__name__}, not a tqdm bar")
        bar.total = total
        bar.refresh()


@contextlib.contextmanager
def trainer_construction_hooks(
    on_model: Callable[[Any, Any], None],
    after_init: Callable[[Any], None],
    on_add_callback: Callable[[Any, Any], None],
) -> Iterator[None]:
    """While the block runs, every ``Trainer`` (subclasses included) calls ``on_model(trainer, model)`` with the
    model it is given, before ``__init__`` builds anything from it, and with each model ``model_init`` makes;
    ``after_init(trainer)`` once ``__init__`` has run (once per instance: a subclass's ``__init__`` calling the
    base's is seen once); ``on_add_callback(trainer, callback)`` before each ``add_callback``. The class is restored
    afterwards."""
    missing = [n for n in ("__init__", "call_model_init", "add_callback") if n not in Trainer.__dict__]
    if missing:
        raise _unsupported(f"Trainer defines no {', '.join(missing)}")
    originals = {name: Trainer.__dict__[name] for name in ("__init__", "call_model_init", "add_callback")}
    signature = inspect.signature(originals["__init__"])

    @functools.wraps(originals["__init__"])
    def __init__(trainer, *args, **kwargs):
        if getattr(trainer, "_gns_launched", False):  # Trainer.__init__ run again on one instance
            return originals["__init__"](trainer, *args, **kwargs)
        trainer._gns_launched = True
        try:
            model = signature.bind(trainer, *args, **kwargs).arguments.get("model")
        except TypeError:  # the Trainer's own error says what is wrong
            model = None
        on_model(trainer, model)
        originals["__init__"](trainer, *args, **kwargs)
        after_init(trainer)

    @functools.wraps(originals["call_model_init"])
    def call_model_init(trainer, *args, **kwargs):
        model = originals["call_model_init"](trainer, *args, **kwargs)
        on_model(trainer, model)
        return model

    @functools.wraps(originals["add_callback"])
    def add_callback(trainer, callback):
        on_add_callback(trainer, callback)
        return originals["add_callback"](trainer, callback)

    Trainer.__init__, Trainer.call_model_init, Trainer.add_callback = __init__, call_model_init, add_callback
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(Trainer, name, original)


def set_schedule_position(lr_scheduler: Any, position: int, batch_factor: float) -> bool:
    """Set a ``LambdaLR`` (every schedule of ``TrainingArguments.lr_scheduler_type`` is one) to ``position`` (in
    optimizer steps of the reference batch) with every group's rate × ``batch_factor``; False for any other
    scheduler (a user's), which is left alone."""
    if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
        return False
    if not hasattr(lr_scheduler, "_last_lr"):
        raise _unsupported("LambdaLR has no _last_lr, which get_last_lr() returned")
    lr_scheduler.last_epoch = position
    for group, base_lr, factor in zip(
        lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base_lr * factor(position) * batch_factor
    lr_scheduler._last_lr = [group["lr"] for group in lr_scheduler.optimizer.param_groups]
    return True


def fetched_accumulation(trainer: Trainer) -> int:
    """The micro-batches the Trainer fetched for the optimizer step that just ended."""
    steps = getattr(trainer, "current_gradient_accumulation_steps", None)
    if not isinstance(steps, int):
        raise _unsupported(f"trainer.current_gradient_accumulation_steps is {steps!r}, not the step's micro-batches")
    return steps


def saved_callback_state(trainer: Trainer, name: str) -> dict | None:
    """The state callback class ``name`` saved in the checkpoint being resumed (``state.stateful_callbacks``, one
    dict or a list of them, the first taken), or None when it saved none."""
    saved = trainer.state.stateful_callbacks.get(name)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    return saved if isinstance(saved, dict) else None


def label_smoothing(trainer: Trainer) -> float:
    """The label-smoothing ε of the Trainer's loss (0 without its label smoother)."""
    smoother = getattr(trainer, "label_smoother", None)
    return float(getattr(smoother, "epsilon", 0.0)) if smoother is not None else 0.0


def _check_trainer_instance(trainer: Trainer) -> None:
    missing = [name for name in _INSTANCE_ATTRIBUTES if not hasattr(trainer, name)]
    accelerator = getattr(trainer, "accelerator", None)
    missing += [f"accelerator.{name}" for name in ("backward", "clip_grad_norm_") if not hasattr(accelerator, name)]
    if missing:
        raise _unsupported(f"the Trainer has no {', '.join(missing)}")


def _unsupported(what: str) -> TrainerIntegrationError:
    import transformers

    return TrainerIntegrationError(
        f"GNSCallback cannot follow the training loop of transformers {transformers.__version__}: {what}. It "
        f"supports {TRANSFORMERS_REQUIREMENT} (checked with {TRANSFORMERS_CHECKED}): pip install "
        f"'{TRANSFORMERS_REQUIREMENT}'."
    )


def _attach(trainer: Trainer) -> list[TrainerLoopObserver]:
    """Install the instance hooks once per Trainer, and attach its observers (again, at every ``train()``)."""
    observers = observers_of(trainer)
    if not observers:
        return observers
    if len(observers) > 1:
        raise ValueError(f"a Trainer can have one GNSCallback, this one has {len(observers)}")
    _check_trainer_instance(trainer)
    if not getattr(trainer, _ATTACHED, False):
        _wrap_compute_loss(trainer)
        _wrap_accelerator(trainer)
        _wrap_log(trainer)
        setattr(trainer, _ATTACHED, True)
    for observer in observers:
        observer.attach(trainer)
    return observers


def _wrap_compute_loss(trainer: Trainer) -> None:
    original = trainer.compute_loss  # bound: a subclass's override (TRL's SFTTrainer) is what gets wrapped

    @functools.wraps(original)
    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if not (torch.is_grad_enabled() and model.training):  # evaluation
            return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        seen = dict(inputs)  # compute_loss may pop the labels
        observers = observers_of(trainer)
        if return_outputs or any(observer.wants_outputs(trainer) for observer in observers):
            with warnings.catch_warnings():  # asked for by the observer, not the user: TRL's notice is not theirs
                if not return_outputs:
                    warnings.filterwarnings("ignore", message=TRL_RETURN_OUTPUTS_NOTICE, category=FutureWarning)
                result = original(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch, **kwargs)
            if not (isinstance(result, tuple | list) and len(result) == 2):
                raise TypeError(
                    f"{type(trainer).__name__}.compute_loss(..., return_outputs=True) returned "
                    f"{type(result).__name__}, not (loss, outputs): GNSCallback needs the model's outputs (the "
                    "logits) on the micro-batches where it observes how the loss weights its examples. Make the "
                    "override return (loss, outputs) when return_outputs=True, as Trainer.compute_loss does."
                )
            loss, outputs = result
        else:
            loss, outputs = original(model, inputs, num_items_in_batch=num_items_in_batch, **kwargs), None
        for observer in observers:
            observer.observe_loss(trainer, seen, num_items_in_batch, loss, outputs)
        return (loss, outputs) if return_outputs else loss

    trainer.compute_loss = compute_loss


def _wrap_accelerator(trainer: Trainer) -> None:
    accelerator = trainer.accelerator
    original_backward, original_clip = accelerator.backward, accelerator.clip_grad_norm_

    def backward(loss, **kwargs):
        scaler = getattr(accelerator, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        for observer in observers_of(trainer):
            observer.observe_backward(trainer, loss, scale)
        return original_backward(loss, **kwargs)

    def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
        for observer in observers_of(trainer):
            observer.before_clipping(trainer)
        gradient_norm = original_clip(parameters, max_norm, *args, **kwargs)
        for observer in observers_of(trainer):
            observer.after_clipping(trainer, gradient_norm)
        return gradient_norm

    accelerator.backward = backward
    accelerator.clip_grad_norm_ = clip_grad_norm_


def backward_factor(accelerator: Any) -> float:
    """What ``accelerator.backward(loss)`` multiplies the loss by before back-propagating it (beyond the gradient
    scaler's scale): 1 / gradient_accumulation_steps (accelerate 1.x, ``Accelerator.backward``, outside DeepSpeed,
    which GNSCallback refuses). GNSCallback checks this against the gradient it observes at the logits, so a change
    in accelerate is an error at the first step, not a silent one."""
    return 1.0 / accelerator.gradient_accumulation_steps


def _wrap_log(trainer: Trainer) -> None:
    original = trainer.log

    def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            for observer in observers_of(trainer):
                logs = {**logs, **observer.log_metrics()}
        original(logs, *args, **kwargs)

    trainer.log = log


def _train(original):
    @functools.wraps(original)
    def wrapper(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint not in (None, False) and observers_of(self):
            _check_trainer_state_file(self, resume_from_checkpoint)
        return original(self, resume_from_checkpoint, *args, **kwargs)

    return wrapper


def _check_trainer_state_file(trainer: Trainer, resume_from_checkpoint: str | os.PathLike | bool) -> None:
    """The ``trainer_state.json`` of the checkpoint ``train(resume_from_checkpoint=...)`` will load (``True``: the
    last one in ``args.output_dir``, as transformers finds it) holds a JSON object; a missing file or folder is left
    to transformers, whose errors name them."""
    if resume_from_checkpoint is True:
        checkpoint = get_last_checkpoint(trainer.args.output_dir) if os.path.isdir(trainer.args.output_dir) else None
    else:
        checkpoint = os.fspath(resume_from_checkpoint)
    path = os.path.join(checkpoint, TRAINER_STATE_NAME) if checkpoint is not None else None
    if path is None or not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as file:
            state = json.load(file)
        problem = None if isinstance(state, dict) else f"it holds a JSON {type(state).__name__}, not an object"
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = f"it is not valid JSON ({error}): cut short by an interrupted save, or damaged"
    if problem is not None:
        others = _other_checkpoints(checkpoint)
        beside = f" (beside it: {', '.join(others)})" if others else ""
        raise CheckpointError(
            f"{path} cannot be read: {problem}. Resume from another checkpoint{beside} with "
            "trainer.train(resume_from_checkpoint=<its folder>)"
        )


def _other_checkpoints(checkpoint: str) -> list[str]:
    """The names of the Trainer's checkpoint folders beside ``checkpoint``, the latest step first."""
    steps = {}
    for folder in Path(checkpoint).parent.iterdir():
        found = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", folder.name)
        if found and folder.is_dir() and folder.name != Path(checkpoint).name:
            steps[folder.name] = int(found.group(1))
    return sorted(steps, key=steps.__getitem__, reverse=True)


def _set_initial_training_values(original):
    @functools.wraps(original)
    def wrapper(self, args, dataloader):
        observers = _attach(self)
        for observer in observers:
            observer.before_loop_bounds(self)
        values = original(self, args, dataloader)
        if observers:
            if not (isinstance(values, tuple) and len(values) == 7):
                raise _unsupported("set_initial_training_values does not return its 7 loop values")
            _, fetches_per_epoch, _, _, _, steps_in_epoch, max_steps = values
            self._gns_loop_bounds = (steps_in_epoch, fetches_per_epoch, max_steps, has_length(dataloader))
            for observer in observers:
                observer.loop_bounds(self, *self._gns_loop_bounds)
        return values

    return wrapper


def _init_training_state(original):
    @functools.wraps(original)
    def wrapper(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial):
        users = observers_of(self)
        try:
            epochs_trained, skip = original(
                self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
            )
        except (ValueError, TypeError) as error:  # restore_callback_states_from_checkpoint: saved options refused
            if resume_from_checkpoint is None or not users:
                raise
            where = os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME)
            raise CheckpointError(f"{where} cannot be resumed ({error}): resume from another checkpoint") from error
        _keep_users_observers(self, users)
        for observer in _attach(self):
            observer.loop_bounds(self, *self._gns_loop_bounds)
            epochs_trained, skip = observer.resume_position(self, epochs_trained, skip, resume_from_checkpoint)
        return epochs_trained, skip

    return wrapper


def _keep_users_observers(trainer: Trainer, users: list[TrainerLoopObserver]) -> None:
    """``restore_callback_states_from_checkpoint=True`` replaces each callback by a new instance made from the
    options saved in the checkpoint; an observer restores its state itself (``resume_position``) and checks the
    options the user passes against the saved ones, so the user's instance is put back in the replacement's place."""
    callbacks = trainer.callback_handler.callbacks
    for user in users:
        for index, callback in enumerate(callbacks):
            if type(callback) is type(user) and callback is not user and user not in callbacks:
                callbacks[index] = user


def wrap_trainer_class(trainer_class: type) -> None:
    """Wrap the three methods above on ``trainer_class``, after checking that they take what the wrappers pass."""
    for name, parameters in _CLASS_METHODS.items():
        method = getattr(trainer_class, name, None)
        if method is None:
            raise _unsupported(f"Trainer.{name} does not exist")
        found = tuple(inspect.signature(method).parameters)[1:]
        if found != parameters:
            raise _unsupported(f"Trainer.{name} takes {found}, not {parameters}")
    trainer_class.train = _train(trainer_class.train)
    trainer_class.set_initial_training_values = _set_initial_training_values(trainer_class.set_initial_training_values)
    trainer_class._init_training_state = _init_training_state(trainer_class._init_training_state)


@functools.cache
def install_trainer_hooks() -> None:
    """Wrap the Trainer's class methods (once per process; subclasses such as TRL's trainers inherit them)."""
    wrap_trainer_class(Trainer)
