"""Backends run tasks (not jobs): local processes, ssh hosts, Slurm clusters."""
