"""dpt_engine.train: the distributed training core shared by the trainers.

* ``engine``: backends behind one interface (single process, DDP, FSDP2, DeepSpeed ZeRO 0-3).
* ``batch``: the backend-independent global batch, split into per-rank micro-batches.
* ``checkpoint``: atomic step-directory checkpoints (rank-aware, keep-last-N, RNG states).
* ``state``: the train state both trainers checkpoint (step, history, data generator, named parts
  such as model / EMA / optimizer) and its save / resume through ``checkpoint``.
* ``ema``: the EMA warm-up both trainers use; ``loop``: their step loop (progress, checkpoint
  cadence, the simulated kill of the tests).
* ``guards``: non-finite loss skipping, out-of-memory hints, throughput/MFU, TensorBoard.
"""

from .batch import GlobalBatch, MicroBatch, draw_global_batch, micro_batches, micro_loss
from .checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from .ema import ema_decay_at
from .engine import BACKENDS, Backend, build_backend, param_groups, setup_process_group
from .guards import BadStepGuard, NonFiniteLossError, TensorBoardLogger, ThroughputMeter, oom_hint, peak_flops
from .loop import TrainingSteps
from .state import TrainState, load_train_state, save_train_state

__all__ = [
    "BACKENDS",
    "Backend",
    "BadStepGuard",
    "CheckpointManager",
    "GlobalBatch",
    "MicroBatch",
    "NonFiniteLossError",
    "TensorBoardLogger",
    "ThroughputMeter",
    "TrainState",
    "TrainingSteps",
    "build_backend",
    "capture_rng_state",
    "draw_global_batch",
    "ema_decay_at",
    "load_train_state",
    "micro_batches",
    "micro_loss",
    "oom_hint",
    "param_groups",
    "peak_flops",
    "restore_rng_state",
    "save_train_state",
    "setup_process_group",
]
