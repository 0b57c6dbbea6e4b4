"""The compile driver: a checkpoint and options in, an artifact folder out (compile, convert-weights, tune), through
frontend -> ir -> schedules -> targets, written with runtime/artifact.py."""
