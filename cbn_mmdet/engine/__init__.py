from .checkpoint import install_checkpoint_loader, load_local_checkpoint
from .hooks import CBNHook, SeedPerIterationHook, burnin_iterations
from .precise_stats import PreciseStatsHook, recompute_precise_stats
from .stats_probe import CBNStatsProbeHook
from .sync_bn_guard import CBNSyncBNError, install_sync_bn_guard

__all__ = ['CBNHook', 'PreciseStatsHook', 'recompute_precise_stats', 'CBNStatsProbeHook', 'SeedPerIterationHook', 'burnin_iterations', 'install_checkpoint_loader', 'load_local_checkpoint',
           'CBNSyncBNError', 'install_sync_bn_guard']
