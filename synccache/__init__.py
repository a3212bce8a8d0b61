"""SyncCache: modality-decoupled residual caching for audio-driven DiTs (depends on torch only)."""
from synccache.config import SyncCacheConfig
from synccache.hooks import SyncCacheHandle, apply_synccache
from synccache.layout import BlockLayout, LayoutError, reference_layout
from synccache.probe import weighted_rel_l1
from synccache.schedule import Schedule, ScheduleError, brute_force, error_curve, max_spans_for_bytes, plan

__all__ = [
    "SyncCacheConfig", "SyncCacheHandle", "apply_synccache", "BlockLayout", "LayoutError",
    "reference_layout", "weighted_rel_l1", "Schedule", "ScheduleError", "plan", "brute_force",
    "error_curve", "max_spans_for_bytes",
]
