"""Mass pseudo-image generation: sharded, deterministic, resumable, multi-process.

* ``plan``: the global (class, index) work list cut into fixed shards; output-dir fingerprint.
* ``sampler``: ``BatchSampler``, one batch from per-sample noise to decoded uint8 images.
* ``formats``: tar (WebDataset), ImageFolder and latent shards, committed atomically with a record.
* ``pool``: background encode/write threads with bounded queues.
* ``runner``: ``run_generation`` (every rank), the manifest with the throughput breakdown.
* ``reader``: ``ShardDataset``, the generated images for stage 3, FID and the grid.
"""

from ..utils.precision import resolve_precision
from .formats import FORMATS, completed_shards, make_format, shard_records
from .plan import SamplingConfigError, ShardPlan, check_output_dir
from .pool import ShardCommitter
from .reader import ShardDataset, is_shard_dir
from .runner import MANIFEST, assemble_manifest, generate_shards, prepare_output, run_generation
from .sampler import BatchSampler, SectionTimer

__all__ = [
    "FORMATS",
    "MANIFEST",
    "BatchSampler",
    "SamplingConfigError",
    "SectionTimer",
    "ShardCommitter",
    "ShardDataset",
    "ShardPlan",
    "assemble_manifest",
    "check_output_dir",
    "completed_shards",
    "generate_shards",
    "is_shard_dir",
    "make_format",
    "prepare_output",
    "resolve_precision",
    "run_generation",
    "shard_records",
]
