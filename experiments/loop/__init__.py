"""The training loop and what it leaves behind: checkpoints, schedules, trackers, run folders."""
