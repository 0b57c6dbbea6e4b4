"""Devices: which TVM target a name means, and what the host is (targets.host needs no TVM compiler)."""
