"""Per-model memory statistics: a sampler that records what engines really take (and, on unified memory, what the
machine loses over each start), a SQLite store, reports and charts, and learned footprints for ``memory_gb: auto``.
The gateway and waker don't need it; it reads them."""

from stats.learned import LearnedMemory, learn_memory, learned_memory_gb, learned_sleep_gb
from stats.sampler import Sampler
from stats.store import Drop, Footprint, Sample, SampleStore, StoreUnavailable, default_db_path

__all__ = ["Drop", "Footprint", "LearnedMemory", "Sample", "SampleStore", "Sampler", "StoreUnavailable",
           "default_db_path", "learn_memory", "learned_memory_gb", "learned_sleep_gb"]
