"""Load benchmark of Clarity Chat against the Channels tutorial consumer (see README.md)."""
