"""Trainer integration: redraw the Performer's random features on a schedule of optimizer steps."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def _unwrap(model):
    """The model under DDP / FSDP / torch.compile wrappers (they keep it in ``.module`` or ``._orig_mod``)."""
    while not hasattr(model, "redraw_features"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return None
        model = inner
    return model


class PerformerFeatureRedrawCallback(TrainerCallback):
    """Redraws the random features of a Performer every ``interval`` optimizer steps.

    Counted in optimizer steps (``state.global_step``), not micro-batches, so gradient accumulation does not change
    the schedule. ``interval=None`` takes the model config's ``feature_redraw_interval``; 0 or None there means
    never. Each draw is seeded by ``config.feature_seed``, the layer and the model's persistent redraw counter, so
    every rank of a distributed job draws the same projections without communicating, and a run resumed from a
    checkpoint (which stores the projections and the counter) continues exactly where it stopped.
    """

    def __init__(self, interval: int | None = None):
        if interval is not None and (not isinstance(interval, int) or interval < 0):
            raise ValueError(f"interval must be a non-negative int or None, got {interval!r}")
        self.interval = interval

    def _interval_for(self, model) -> int:
        if self.interval is not None:
            return self.interval
        return getattr(model.config, "feature_redraw_interval", None) or 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        performer = _unwrap(model)
        if performer is None:
            logger.warning("PerformerFeatureRedrawCallback: %s has no redraw_features(); it will do nothing",
                           type(model).__name__)
        elif state.is_world_process_zero:
            interval = self._interval_for(performer)
            logger.info("redrawing random features every %s optimizer steps", interval if interval else "never (0)")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        performer = _unwrap(model)
        if performer is None:
            return
        interval = self._interval_for(performer)
        if not interval or state.global_step % interval:
            return
        if performer.redraw_features() and state.is_world_process_zero:
            logger.info("step %d: redrew random features (redraw #%d)", state.global_step,
                        performer.feature_redraw_count)


__all__ = ["PerformerFeatureRedrawCallback"]
