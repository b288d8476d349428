"""The tutorial-style Channels chat every figure is compared with (no auth, no storage)."""
