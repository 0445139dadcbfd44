"""Per-model memory statistics: a sampler that records what engines really take, a SQLite store, reports and charts,
and learned footprints for ``memory_gb: auto``. The gateway and waker don't need it; it reads them."""

from stats.learned import learned_memory_gb, learned_sleep_gb
from stats.sampler import Sampler
from stats.store import Footprint, Sample, SampleStore, default_db_path

__all__ = ["Footprint", "Sample", "SampleStore", "Sampler", "default_db_path", "learned_memory_gb",
           "learned_sleep_gb"]
