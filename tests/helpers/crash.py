"""Stopping a LisaTrainer run at a chosen step, as a kill would."""

import pytest


def crash_after(trainer, step: int) -> None:
    """Run ``trainer.train()`` until step ``step`` has run and been logged, then die (KeyboardInterrupt)."""
    real_step = trainer.train_step

    def crashing_step():
        if trainer.step == step:
            raise KeyboardInterrupt
        return real_step()

    trainer.train_step = crashing_step
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
