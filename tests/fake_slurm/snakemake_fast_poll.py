"""`snakemake` with the SLURM executor plugin's status polling shortened, for tests against fake SLURM.

The plugin waits 40 s before its first `sacct` and 40-180 s between later ones, sensible on a cluster but
minutes of idle time for a test whose jobs take seconds. Only those two intervals change here; the sbatch
command lines, the sacct parsing and everything else are the installed plugin's own.

    python tests/fake_slurm/snakemake_fast_poll.py --profile profiles/slurm ...   (same arguments as snakemake)
"""

import dataclasses
import sys

import snakemake_executor_plugin_slurm as slurm

POLL_SECONDS = 1

slurm.common_settings = dataclasses.replace(slurm.common_settings,
                                            init_seconds_before_status_checks=POLL_SECONDS)
slurm.Executor.next_seconds_between_status_checks = property(lambda self: POLL_SECONDS,
                                                             lambda self, value: None)

if __name__ == "__main__":
    from snakemake.cli import main  # after the patch: the plugin registry reads common_settings on import

    sys.exit(main())
