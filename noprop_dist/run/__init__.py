"""A run on disk: the run directory and its checkpoints (``rundir``), the lifecycle every
trainer goes through (``lifecycle``), reading a finished run back (``results``) and its plot."""
